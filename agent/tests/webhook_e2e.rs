//! Attribution end to end, where admission and persistence part ways: the `reverser-agent`
//! binary (child processes) with its webhook registered in an API server (the real kube-apiserver
//! by default, the emulator with `REVERSER_E2E_BACKEND=emulator`), the real writer (in-process)
//! and a bare Git repository; authors are read back with the git CLI.
//!
//! ```text
//! users ──write──▶ API server ───AdmissionReview──▶ agent webhook (fact) ─┐
//!                      │          ──AdmissionReview──▶ another webhook (may deny)
//!                      └──watch──▶ agent (leader) ──join──▶ writer ──▶ git log --format=%an
//! ```
//!
//! - A request another webhook denies was still seen by ours (webhooks cannot know each
//!   other's verdicts): its fact must never author a later change.
//! - Leader failover: with `--webhook-manage-configuration` and a per-instance
//!   `--webhook-url`, the configuration follows the leadership, and the new leader's own
//!   webhook attributes the changes after the failover.
//!
//! Every wait has a generous bound only to turn a hang into a failure; nothing asserts on time.

mod support;
mod webhook_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::cluster::TestCluster;
use support::world::{self, KubeconfigFile, start_writer};
use support::{free_port, http_get, wait_async};
use testkit::BareRepo;
use webhook_support::Pki;

const BRANCH: &str = "main";
const BOT: &str = "GitOps Reverser";
/// The configuration the agent manages (named after `--controller-name`).
const OURS: &str = "gitops-reverser";
const APP: &str = "clusters/prod/core/v1/configmaps/shop/app.yaml";

/// One namespace, one ConfigMap, and the agent's configuration mirroring exactly the ConfigMaps
/// of `shop` (so the webhook's rules are known exactly).
fn cluster_yaml(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: app, namespace: shop}}
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
apiVersion: v1
kind: Pod
metadata: {{name: agent-b, namespace: gitops-reverser}}
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
# The users the tests impersonate (group `devs`) may change the shop's ConfigMaps: a real API
# server authorizes them (RBAC), the emulator lets every request through.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-editor, namespace: shop}}
rules: [{{apiGroups: [''], resources: [configmaps], verbs: [get, list, watch, update, patch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: devs-edit-configmaps, namespace: shop}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-editor}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: devs}}]
"
    )
}

struct World {
    cluster: TestCluster,
    repo: BareRepo,
    writer: reverser_writer::RunningWriter,
    _writer_dir: tempfile::TempDir,
    kubeconfig: KubeconfigFile,
    /// The webhook certificate (for 127.0.0.1) and its CA, shared by every agent.
    pki: Pki,
    ca_file: PathBuf,
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
        let pki = Pki::new();
        let ca_file = pki.dir.path().join("ca.crt");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        World {
            cluster,
            repo,
            writer,
            _writer_dir: writer_dir,
            kubeconfig,
            pki,
            ca_file,
        }
    }

    /// Starts an agent as Pod `pod`, serving its webhook on its own port and, while leading,
    /// registering that port's URL (`--webhook-url`), as a per-Pod `https://$(POD_IP):9443`.
    fn agent(&self, pod: &str) -> Agent {
        let admin = format!("127.0.0.1:{}", free_port());
        let webhook = format!("127.0.0.1:{}", free_port());
        let writer_url = format!("http://{}", self.writer.grpc_addr);
        let mut cmd = world::Agent::command(&writer_url, &self.kubeconfig.path, &admin);
        cmd.args(["--cluster-name", "e2e"])
            .args(["--controller-namespace", "gitops-reverser"])
            // Short Lease timings keep the failover quick; the logic is the same.
            .args([
                "--leader-election-lease-sec",
                "3",
                "--leader-election-renew-sec",
                "1",
            ])
            .args(["--webhook-addr", &webhook])
            .arg("--webhook-cert")
            .arg(self.pki.cert_file())
            .arg("--webhook-key")
            .arg(self.pki.key_file())
            .arg("--webhook-manage-configuration")
            .arg("--webhook-ca-bundle")
            .arg(&self.ca_file)
            .args(["--webhook-url", &format!("https://{webhook}")])
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", "gitops-reverser");
        Agent {
            process: world::Agent::spawn(&mut cmd, &admin),
            url: format!("https://{webhook}/process-validating-webhook"),
            webhook,
        }
    }

    async fn wait_for_file(&self, path: &str, contains: &str) {
        wait_async(&format!("{path} containing {contains:?}"), || async {
            self.repo
                .read(BRANCH, path)
                .filter(|text| text.contains(contains))
        })
        .await;
    }

    /// `git log --format=%an` of one file, newest first (the git CLI, as a user would check).
    fn authors_of(&self, path: &str) -> Vec<String> {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(self.repo.path())
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

    fn configurations(&self, client: &kube::Client) -> Api<ValidatingWebhookConfiguration> {
        Api::all(client.clone())
    }

    /// Waits until our configuration lists the shop ConfigMaps and calls `url`.
    async fn wait_for_registration(&self, client: &kube::Client, url: &str) {
        let api = self.configurations(client);
        wait_async(
            &format!("the webhook configuration calling {url}"),
            || async {
                let vwc = api.get_opt(OURS).await.ok()??;
                let hook = serde_json::to_value(&vwc.webhooks?[0]).ok()?;
                (hook["clientConfig"]["url"] == url
                    && hook["rules"][0]["resources"] == json!(["configmaps"]))
                .then_some(())
            },
        )
        .await;
    }

    async fn stop(self) {
        self.writer.stop().await.unwrap();
        self.cluster.shutdown().await;
    }
}

/// An agent process and its webhook endpoint.
struct Agent {
    process: world::Agent,
    /// The URL it registers while leading.
    url: String,
    /// Where it serves the webhook while leading.
    webhook: String,
}

impl Agent {
    /// One metric, 0 when the admin port does not answer.
    async fn metric(&self, name: &str) -> f64 {
        self.process.metric(name).await.unwrap_or_default()
    }

    /// Waits until it leads and everything ingestion produced was acked by the writer (so pushed).
    async fn settle(&self) {
        self.process.settle_as_leader().await
    }

    async fn kill(&mut self) {
        self.process.kill().await
    }
}

/// ConfigMaps of `shop` as `user` (the `Impersonate-User` header).
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

fn color(value: &str) -> Patch<Value> {
    Patch::Merge(json!({"data": {"color": value}}))
}

/// Another team's validating webhook: denies every write by `denied_user`, allows the rest.
/// HTTPS (the emulator, like the API server, calls webhooks over TLS only).
struct Denier {
    addr: SocketAddr,
    pki: Pki,
    /// Reviews answered, and how many of them were denials.
    calls: Arc<AtomicUsize>,
    denials: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Denier {
    async fn start(denied_user: &'static str) -> Denier {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let pki = Pki::new();
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
        let (calls, denials) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let (c, d) = (calls.clone(), denials.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, c, d) = (acceptor.clone(), c.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (c, d) = (c.clone(), d.clone());
                        async move {
                            let body: Bytes = BodyExt::collect(req.into_body())
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                            let request = &review["request"];
                            let deny = request["userInfo"]["username"] == denied_user;
                            c.fetch_add(1, Ordering::SeqCst);
                            if deny {
                                d.fetch_add(1, Ordering::SeqCst);
                            }
                            let mut response = json!({"uid": request["uid"], "allowed": !deny});
                            if deny {
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
            calls,
            denials,
            task,
        }
    }

    /// Its configuration: every ConfigMap write, `failurePolicy: Fail`. The emulator calls
    /// configurations in name order (the API server calls them all, in parallel): `zz-` puts
    /// this one after ours, so ours sees every request this one denies.
    fn configuration(&self) -> ValidatingWebhookConfiguration {
        use base64::Engine as _;
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "zz-freeze"},
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
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                           "operations": ["CREATE", "UPDATE", "DELETE"],
                           "resources": ["configmaps"], "scope": "*"}]
            }]
        }))
        .unwrap()
    }
}

/// Alice's update is seen by our webhook (a fact: her content, based on the current version)
/// and then denied by another webhook, so it never persists. Her fact must author nothing
/// afterwards — in particular not a later change that ends in exactly the content she asked
/// for, made where our webhook does not see it: with a join on identity and content alone her
/// lingering fact would claim that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_rejected_by_another_webhook_leaves_no_author_behind() {
    let world = World::start().await;
    let admin = world.cluster.client().await;
    let agent = world.agent("agent-a");
    world.wait_for_registration(&admin, &agent.url).await;
    world.wait_for_file(APP, "color: blue").await;
    agent.settle().await;
    let denier = Denier::start("alice").await;
    let configurations = world.configurations(&admin);
    configurations
        .create(&PostParams::default(), &denier.configuration())
        .await
        .unwrap();

    // 1. Alice asks for red: our webhook records it, the other one denies it.
    let recorded = "gitops_reverser_agent_webhook_requests_total{outcome=\"recorded\"}";
    let recorded_before = agent.metric(recorded).await;
    let denied = as_user(&world.cluster, "alice")
        .await
        .patch("app", &PatchParams::default(), &color("red"))
        .await
        .expect_err("the other webhook denies alice");
    match denied {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("admission webhook \"freeze.policy.example.com\" denied the request"),
                "{status:?}"
            );
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    assert_eq!(denier.denials.load(Ordering::SeqCst), 1);
    assert_eq!(
        agent.metric(recorded).await,
        recorded_before + 1.0,
        "our webhook saw alice's attempt and holds a fact for it"
    );
    let app = Api::<ConfigMap>::namespaced(admin.clone(), "shop");
    let live = app.get("app").await.unwrap();
    assert_eq!(live.data.unwrap()["color"], "blue", "nothing persisted");

    // 2. Our webhook stops seeing writes (its configuration removed; the agent re-applies it
    //    only when the watched types change): green, then red — alice's content exactly.
    let ours = configurations.get(OURS).await.unwrap();
    configurations
        .delete(OURS, &DeleteParams::default())
        .await
        .unwrap();
    // The real API server keeps calling a deleted configuration's webhooks for a moment (its informer lags): write
    // another object until our webhook no longer sees the writes.
    let calls = "gitops_reverser_agent_webhook_requests_total{outcome=\"recorded\"}";
    let probe = Api::<ConfigMap>::namespaced(admin.clone(), "shop");
    let unseen_by = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    for round in 0.. {
        let before = agent.metric(calls).await;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "probe", "namespace": "shop"},
            "data": {"round": round.to_string()},
        }))
        .unwrap();
        probe
            .patch(
                "probe",
                &PatchParams::apply("probe").force(),
                &Patch::Apply(&cm),
            )
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if agent.metric(calls).await == before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < unseen_by,
            "our webhook still sees writes 30 s after its configuration was deleted"
        );
    }
    app.patch("app", &PatchParams::default(), &color("green"))
        .await
        .unwrap();
    world.wait_for_file(APP, "color: green").await;
    app.patch("app", &PatchParams::default(), &color("red"))
        .await
        .unwrap();
    world.wait_for_file(APP, "color: red").await;
    assert_eq!(
        world.authors_of(APP),
        [BOT, BOT, BOT],
        "red was not alice's: her request was denied (initial, green, red)"
    );
    assert!(
        agent
            .metric("gitops_reverser_agent_attribution_unmatched_total")
            .await
            >= 1.0,
        "alice's fact was dropped, not matched"
    );

    // 3. With our webhook back, a different change by bob is bob's.
    let mut restored = ours.clone();
    restored.metadata = kube::api::ObjectMeta {
        name: Some(OURS.into()),
        labels: ours.metadata.labels.clone(),
        ..Default::default()
    };
    configurations
        .create(&PostParams::default(), &restored)
        .await
        .unwrap();
    as_user(&world.cluster, "bob")
        .await
        .patch("app", &PatchParams::default(), &color("yellow"))
        .await
        .unwrap();
    world.wait_for_file(APP, "color: yellow").await;
    assert_eq!(world.authors_of(APP), ["bob", BOT, BOT, BOT]);
    assert!(
        denier.calls.load(Ordering::SeqCst) >= 4,
        "the other webhook saw every write"
    );
    agent.settle().await;
    assert_eq!(
        agent
            .metric("gitops_reverser_agent_attribution_matches_total")
            .await,
        1.0,
        "only bob's fact matched"
    );
    denier.task.abort();
    drop(agent);
    world.stop().await;
}

/// Two agents, each serving its webhook on its own address: the leader registers its own
/// URL; when it dies, the new leader re-registers the configuration with its URL, and a change
/// made after the failover is authored by the user who made it. If the configuration stayed
/// on the dead leader, `failurePolicy: Ignore` would let the change through unattributed and
/// the commit would be the bot's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_moves_the_webhook_endpoint_with_the_leadership() {
    let world = World::start().await;
    let admin = world.cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "gitops-reverser");
    let is_leader = |name: &'static str| {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.ok()?;
            let labels = pod.metadata.labels.unwrap_or_default();
            (labels.get("configbutler.ai/leader").map(String::as_str) == Some("true")).then_some(())
        }
    };
    // `a` leads first (started alone), `b` stands by.
    let mut a = world.agent("agent-a");
    world.wait_for_registration(&admin, &a.url).await;
    wait_async("agent-a's leader label", || is_leader("agent-a")).await;
    let b = world.agent("agent-b");
    assert_ne!(a.url, b.url);
    world.wait_for_file(APP, "color: blue").await;
    a.settle().await;
    wait_async("agent-b to run as a standby", || async {
        (http_get(&b.process.admin, "/metrics").await.is_some()
            && b.metric("gitops_reverser_agent_leader").await == 0.0)
            .then_some(())
    })
    .await;

    // A standby answers nothing on the webhook port; the leader does.
    assert!(
        tokio::net::TcpStream::connect(&b.webhook).await.is_err(),
        "the standby does not listen on its webhook port"
    );
    assert!(tokio::net::TcpStream::connect(&a.webhook).await.is_ok());

    as_user(&world.cluster, "alice")
        .await
        .patch("app", &PatchParams::default(), &color("red"))
        .await
        .unwrap();
    world.wait_for_file(APP, "color: red").await;
    assert_eq!(world.authors_of(APP), ["alice", BOT]);

    // The leader dies without releasing anything; `b` takes the Lease when it expires and
    // points the webhook configuration at itself.
    a.kill().await;
    world.wait_for_registration(&admin, &b.url).await;
    wait_async("agent-b's leader label", || is_leader("agent-b")).await;
    assert!(
        tokio::net::TcpStream::connect(&b.webhook).await.is_ok(),
        "the new leader listens"
    );
    b.settle().await;

    as_user(&world.cluster, "bob")
        .await
        .patch("app", &PatchParams::default(), &color("green"))
        .await
        .unwrap();
    world.wait_for_file(APP, "color: green").await;
    assert_eq!(world.authors_of(APP), ["bob", "alice", BOT]);
    b.settle().await;
    assert_eq!(
        b.metric("gitops_reverser_agent_attribution_matches_total")
            .await,
        1.0,
        "the new leader's own webhook saw bob's change"
    );
    drop(b);
    world.stop().await;
}
