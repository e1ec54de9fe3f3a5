//! Git credentials from a Secret (`GitRepoConfig.spec.secretRef`), end to end: a real API server (an emulator with
//! `REVERSER_E2E_BACKEND=emulator`), the `reverser-agent` binary reaching an in-process writer over TLS, and an HTTPS
//! git server (git http-backend behind basic auth). The writer has no credentials of its own (no `--config`, no
//! `--git-credentials`): every push authenticates with what the agent read from the Secret.
//!
//! ```text
//! Secret git-creds ──▶ agent ──TLS──▶ writer (no credentials) ──HTTPS + basic auth──▶ git http-backend
//! ```
//!
//! Checked: the first push uses the Secret's token; a rotated token (server and Secret) takes effect without a
//! restart; a Secret missing a key keeps its destination undeclared with `InvalidCredentialsSecret`; an agent
//! without TLS to the writer refuses to send credentials (`CredentialsNeedTls`); and no token value appears in any
//! log (debug level), metric, status or file of the writer's work dir.
//!
//! Waits have generous upper bounds only to turn a hang into a failure; no test asserts on durations.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use rcgen::{CertificateParams, KeyPair};
use testkit::{BareRepo, HttpGitServer};

mod support;

use support::cluster::TestCluster;
use support::world::{Agent, KubeconfigFile, crds_dir, start_writer};
use support::{configbutler_object, free_port, http_get, wait_async, wait_for_condition};

const NS: &str = "gitops-reverser";
const USER: &str = "reverser-bot";
const FIRST_TOKEN: &str = "tok1-7f3a9c1e5b2d4a68";
const SECOND_TOKEN: &str = "tok2-0b6e2d8f4c1a9e37";
/// The value of the broken Secret (a password without a username).
const BROKEN_TOKEN: &str = "tok3-5d9a1c7e3f2b8046";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn secret(name: &str, data: &[(&str, &str)]) -> String {
    let data: Vec<String> = data
        .iter()
        .map(|(k, v)| format!("{k}: {}", b64(v)))
        .collect();
    format!(
        "
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {NS}}}
type: Opaque
data: {{{}}}
",
        data.join(", ")
    )
}

/// One repository and destination per name; `own` reads Secret `git-creds`, `broken` reads `broken-creds`.
fn config(repo_url: &str) -> String {
    let mut text = format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
"
    );
    for (name, secret) in [("own", "git-creds"), ("broken", "broken-creds")] {
        text.push_str(&format!(
            "
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: {name}, namespace: {NS}}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [main]
  secretRef: {{name: {secret}}}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: {name}, namespace: {NS}}}
spec:
  repoRef: {{namespace: {NS}, name: {name}}}
  branch: main
  baseFolder: clusters/{name}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: {name}, namespace: shop}}
spec:
  destinationRef: {{name: {name}, namespace: {NS}}}
  rules: [{{apiGroups: [''], resources: [configmaps]}}]
"
        ));
    }
    text
}

fn configmap(name: &str) -> String {
    format!(
        "
apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}, namespace: shop}}
data: {{app: {name}}}
"
    )
}

/// Everything the writer logs (in process), at debug level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The writer's server certificate (for `localhost`) and the CA file agents trust.
struct WriterTls {
    dir: tempfile::TempDir,
}

impl WriterTls {
    fn new() -> WriterTls {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        WriterTls { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// An agent at debug level with stdout and stderr in files under `logs`; `tls` adds the writer's CA.
fn spawn_agent(
    writer_url: &str,
    kubeconfig: &Path,
    logs: &Path,
    label: &str,
    tls: Option<&WriterTls>,
) -> Agent {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Agent::command(writer_url, kubeconfig, &admin);
    cmd.env("AGENT_LOG_LEVEL", "debug")
        .stdout(Stdio::from(
            std::fs::File::create(logs.join(format!("{label}.stdout"))).unwrap(),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(logs.join(format!("{label}.stderr"))).unwrap(),
        ))
        .args(["--controller-namespace", NS])
        // The Secret is re-read on this tick.
        .args(["--encryption-refresh", "1s"])
        .args([
            "--leader-election-lease-sec",
            "3",
            "--leader-election-renew-sec",
            "1",
        ]);
    if let Some(tls) = tls {
        cmd.arg("--writer-ca")
            .arg(tls.path("tls.crt"))
            .args(["--writer-tls-domain", "localhost"]);
    }
    Agent::spawn(&mut cmd, &admin)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if entry.file_type().unwrap().is_file() {
                out.push(path);
            }
        }
    }
    out
}

/// Panics naming `place` when `haystack` holds any secret value (plain, base64, or base64 of `user:value`).
fn assert_no_secret(place: &str, haystack: &[u8]) {
    let text = String::from_utf8_lossy(haystack);
    for token in [FIRST_TOKEN, SECOND_TOKEN, BROKEN_TOKEN] {
        for form in [
            token.to_owned(),
            b64(token),
            b64(&format!("{USER}:{token}")),
        ] {
            assert!(
                !text.contains(&form),
                "a credential ({form}) appears in {place}"
            );
        }
    }
}

async fn object_json(client: &kube::Client, kind: &str, name: &str) -> String {
    let obj = configbutler_object(client, kind, Some(NS), name)
        .await
        .unwrap_or_else(|| panic!("{kind} {name} exists"));
    serde_json::to_string(&obj).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_ref_credentials_push_rotate_and_never_leak() {
    // The writer runs in this process: its logs go to `writer_logs`, at debug level.
    let writer_logs = Captured::default();
    let sink = writer_logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("reverser_writer=trace,reverser_common=trace,info")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .try_init()
        .expect("the only subscriber");
    let _ = rustls::crypto::ring::default_provider().install_default();

    let bare = BareRepo::new();
    let server = HttpGitServer::start(&bare, USER, FIRST_TOKEN);
    let repo_url = server.url();
    let tls = WriterTls::new();
    let work = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let ca = server.ca_file().display().to_string();
    let writer = start_writer(
        "127.0.0.1:0",
        work.path(),
        &[
            "--tls-cert",
            &tls.path("tls.crt"),
            "--tls-key",
            &tls.path("tls.key"),
            "--git-ca-file",
            &ca,
        ],
    )
    .await;
    let writer_url = format!("https://127.0.0.1:{}", writer.grpc_addr.port());

    let cluster = TestCluster::start().await;
    cluster.apply_dir(&crds_dir()).await;
    cluster.apply_yaml(&config(&repo_url)).await;
    cluster
        .apply_yaml(&secret(
            "git-creds",
            &[("username", USER), ("password", FIRST_TOKEN)],
        ))
        .await;
    // A password without a username: not usable.
    cluster
        .apply_yaml(&secret("broken-creds", &[("password", BROKEN_TOKEN)]))
        .await;
    cluster.apply_yaml(&configmap("app")).await;
    let kubeconfig = KubeconfigFile::write(&cluster, None);
    let client = cluster.client().await;
    let mut agent = spawn_agent(
        &writer_url,
        &kubeconfig.path,
        logs.path(),
        "tls",
        Some(&tls),
    );

    // (1) The ConfigMap lands over HTTPS, pushed with the Secret's token.
    let first = "clusters/own/core/v1/configmaps/shop/app.yaml";
    wait_async("the first ConfigMap in Git", async || {
        bare.read("main", first)
    })
    .await;
    wait_for_condition(&client, "GitDestination", Some(NS), "own", "Ready", "True").await;

    // (3) The Secret without a username: its destination is not declared, so nothing of it is pushed.
    let (reason, message) = wait_for_condition(
        &client,
        "GitDestination",
        Some(NS),
        "broken",
        "Ready",
        "False",
    )
    .await;
    assert_eq!(reason, "InvalidCredentialsSecret", "{message}");

    // (2) Rotation: the server accepts only the new token, the Secret is updated; a new change lands without a
    // restart (the agent re-reads the Secret and re-declares; the writer's worker takes the new credentials).
    server.set_credentials(USER, SECOND_TOKEN);
    cluster
        .apply_yaml(&secret(
            "git-creds",
            &[("username", USER), ("password", SECOND_TOKEN)],
        ))
        .await;
    cluster.apply_yaml(&configmap("after-rotation")).await;
    let second = "clusters/own/core/v1/configmaps/shop/after-rotation.yaml";
    wait_async(
        "the ConfigMap changed after the rotation in Git",
        async || bare.read("main", second),
    )
    .await;
    assert!(agent.is_running(), "the agent was not restarted");

    // Still nothing of the broken destination: both ConfigMaps were selected by its WatchRule too.
    let broken: Vec<String> = bare
        .ls_tree("main")
        .into_iter()
        .filter(|f| f.starts_with("clusters/broken"))
        .collect();
    assert!(
        broken.is_empty(),
        "the undeclared destination pushed: {broken:?}"
    );
    assert_eq!(
        wait_for_condition(
            &client,
            "GitDestination",
            Some(NS),
            "broken",
            "Ready",
            "False"
        )
        .await
        .0,
        "InvalidCredentialsSecret"
    );

    // (5) No token in the agent's metrics, the statuses, or the writer's metrics, while it all runs.
    let agent_metrics = agent.metrics().await.expect("the agent's /metrics answers");
    assert_no_secret("the agent's /metrics", agent_metrics.as_bytes());
    let writer_metrics = http_get(&writer.admin_addr.to_string(), "/metrics")
        .await
        .expect("the writer's /metrics answers");
    assert_no_secret("the writer's /metrics", writer_metrics.as_bytes());
    for kind in ["GitDestination", "GitRepoConfig"] {
        for name in ["own", "broken"] {
            let json = object_json(&client, kind, name).await;
            assert_no_secret(&format!("{kind} {name}"), json.as_bytes());
        }
    }

    // (4) An agent reaching a writer without TLS does not send credentials: its destination says why.
    agent.kill().await;
    let plain_work = tempfile::tempdir().unwrap();
    let plain_writer =
        start_writer("127.0.0.1:0", plain_work.path(), &["--git-ca-file", &ca]).await;
    let plain_url = format!("http://127.0.0.1:{}", plain_writer.grpc_addr.port());
    let mut plain = spawn_agent(&plain_url, &kubeconfig.path, logs.path(), "plain", None);
    let (reason, message) = wait_async("own Ready=False CredentialsNeedTls", async || {
        support::condition(&client, "GitDestination", Some(NS), "own", "Ready")
            .await
            .filter(|(status, reason, _)| status == "False" && reason == "CredentialsNeedTls")
            .map(|(_, reason, message)| (reason, message))
    })
    .await;
    assert_eq!(reason, "CredentialsNeedTls", "{message}");
    let plain_metrics = plain.metrics().await.expect("the agent's /metrics answers");
    assert_no_secret("the plaintext agent's /metrics", plain_metrics.as_bytes());
    plain.kill().await;
    plain_writer.stop().await.unwrap();
    writer.stop().await.unwrap();

    // (5) No token in any log, status or work dir file once everything stopped.
    for name in ["own", "broken"] {
        let json = object_json(&client, "GitDestination", name).await;
        assert_no_secret(&format!("GitDestination {name}"), json.as_bytes());
    }
    let mut log_bytes = 0;
    for file in files_under(logs.path()) {
        let bytes = std::fs::read(&file).unwrap();
        log_bytes += bytes.len();
        assert_no_secret(&file.display().to_string(), &bytes);
    }
    let writer_log = writer_logs.text();
    assert!(
        writer_log.contains("DEBUG") && log_bytes > 0,
        "the logs were captured at debug level"
    );
    assert_no_secret("the writer's log", writer_log.as_bytes());
    let work_files = files_under(work.path());
    assert!(
        !work_files.is_empty(),
        "the writer's work dir holds its clone"
    );
    for file in work_files
        .iter()
        .chain(files_under(plain_work.path()).iter())
    {
        assert_no_secret(&file.display().to_string(), &std::fs::read(file).unwrap());
    }
    cluster.shutdown().await;
}
