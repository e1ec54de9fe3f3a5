//! Secrets end to end: an API server (real by default, the emulator with `REVERSER_E2E_BACKEND=emulator`) +
//! the `reverser-agent` binary + the in-process writer + a bare repository.
//! Secrets reach Git only as SOPS + age files (checked with the independent `tests/sops/verify.mjs`, which uses
//! the npm package sops-age and recomputes the MAC), never in plaintext anywhere: not in any blob of any commit,
//! not in the writer's work dir, not in the agent's or the writer's logs. Restarting over unchanged Secrets
//! commits nothing; changing recipients re-encrypts in one commit; destinations without (usable) encryption get
//! a condition and no file. Needs `scripts/install-test-deps.sh` (node modules in `.tools/node`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use age::secrecy::ExposeSecret;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use testkit::BareRepo;

mod support;

use support::cluster::TestCluster;
use support::world::{Agent, KubeconfigFile, start_writer};
use support::{condition, free_port, wait, wait_async};

const BRANCH: &str = "main";
const DB_FILE: &str = "clusters/prod/core/v1/secrets/shop/db.sops.yaml";
const API_FILE: &str = "clusters/prod/core/v1/secrets/shop/api.sops.yaml";
/// Values that must never appear anywhere, as plaintext and as base64 (what `data` holds).
const PLAINTEXTS: &[&str] = &[
    "s3cr3t-hunter-2718",
    "r0tated-hunter-3141",
    "api-t0ken-1618",
];

/// In-process logs (the writer's), captured for the plaintext scan.
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

fn needles() -> Vec<String> {
    use base64::Engine;
    PLAINTEXTS
        .iter()
        .flat_map(|p| {
            [
                (*p).to_owned(),
                base64::engine::general_purpose::STANDARD.encode(p),
            ]
        })
        .collect()
}

fn config(repo_url: &str, recipients: &[String]) -> String {
    let list = recipients
        .iter()
        .map(|r| format!("'{r}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: Secret
metadata: {{name: db, namespace: shop}}
type: Opaque
data: {{password: czNjcjN0LWh1bnRlci0yNzE4, user: YWRtaW4=}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{allowClusterRules: true}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: clusters/prod
  encryption: {{age: {{recipients: [{list}]}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: plain, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: clusters/plain
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: bad, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: clusters/bad
  encryption: {{age: {{recipients: ['age1-not-a-key', 'AGE-SECRET-KEY-1NOTHERE']}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: keyed, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: clusters/keyed
  encryption: {{age: {{recipientsSecretRef: {{name: age-recipients, key: recipients}}}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: age-recipients, namespace: gitops-reverser}}
data: {{recipients: '{first}'}}
",
        first = b64(&recipients[0])
    ) + &["prod", "plain", "bad", "keyed"]
        .iter()
        .map(|d| {
            format!(
                "---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: secrets-{d}}}
spec:
  destinationRef: {{name: {d}, namespace: gitops-reverser}}
  rules: [{{scope: Namespaced, resources: [secrets, configmaps]}}]
"
            )
        })
        .collect::<String>()
}

fn start_agent(writer: &str, kubeconfig: &Path, log: &Path) -> Agent {
    let admin = format!("127.0.0.1:{}", free_port());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Agent::spawn(
        Agent::command(writer, kubeconfig, &admin)
            .args(["--controller-namespace", "gitops-reverser"])
            .args(["--leader-election", "false"])
            .args(["--encryption-refresh", "1s"])
            // Everything the agent logs, debug included, goes through the plaintext scan.
            .env("AGENT_LOG_LEVEL", "debug")
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log)),
        &admin,
    )
}

async fn wait_for_skipped(client: &kube::Client, rule: &str, reason: &str) -> String {
    wait_async(&format!("{rule} SecretsSkipped={reason}"), || async {
        condition(client, "ClusterWatchRule", None, rule, "SecretsSkipped")
            .await
            .filter(|(status, r, _)| status == "True" && r == reason)
            .map(|(_, _, message)| message)
    })
    .await
}

fn node_modules() -> PathBuf {
    let dir = testkit::manifest_dir().join("../.tools/node/node_modules");
    assert!(
        dir.join("sops-age").is_dir(),
        "run scripts/install-test-deps.sh"
    );
    dir
}

/// Decrypts `yaml` with `identity` through sops-age and checks the MAC independently.
fn decrypt(yaml: &str, identity: &age::x25519::Identity) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = (dir.path().join("f.sops.yaml"), dir.path().join("key.txt"));
    std::fs::write(&file, yaml).unwrap();
    std::fs::write(&key, identity.to_string().expose_secret()).unwrap();
    let out = std::process::Command::new("node")
        .arg(testkit::manifest_dir().join("tests/sops/verify.mjs"))
        .args([&file, &key])
        .env("SOPS_NODE_MODULES", node_modules())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["macOk"], true, "{report:#}");
    report["decrypted"].clone()
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every blob of every commit, as text.
fn all_blobs(repo: &Path) -> Vec<(String, String)> {
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("--git-dir")
            .arg(repo)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["rev-list", "--objects", "--all"])
        .lines()
        .filter_map(|l| l.split_once(' ').or(Some((l, ""))))
        .filter(|(oid, _)| git(&["cat-file", "-t", oid]).trim() == "blob")
        .map(|(oid, path)| (path.to_owned(), git(&["cat-file", "-p", oid])))
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_git_only_encrypted_without_churn_and_never_in_plaintext() {
    let logs = Captured::default();
    let sink = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug,h2=info,hyper=info,tower=info,kube_emulator=info")
        .with_writer(move || sink.clone())
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (a, b) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let (ra, rb) = (a.to_public().to_string(), b.to_public().to_string());

    let cluster = TestCluster::start().await;
    cluster
        .apply_dir(&testkit::manifest_dir().join("../crds"))
        .await;
    let repo = BareRepo::new();
    cluster
        .apply_yaml(&config(&repo.file_url(), std::slice::from_ref(&ra)))
        .await;
    let client = cluster.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "shop");

    let writer_dir = tempfile::tempdir().unwrap();
    let writer = start_writer("127.0.0.1:0", writer_dir.path(), &[]).await;
    let writer_url = format!("http://{}", writer.grpc_addr);
    let kube_dir = tempfile::tempdir().unwrap();
    let kubeconfig_file = KubeconfigFile::write(&cluster, None);
    let kubeconfig = kubeconfig_file.path.clone();
    let agent_log = kube_dir.path().join("agent.log");

    let agent = start_agent(&writer_url, &kubeconfig, &agent_log);
    let read = |path: &str| repo.read(BRANCH, path);

    // 1. Created: only the encrypting destination gets the Secret, as a SOPS file sops-age decrypts.
    let first = wait("the encrypted db Secret", || read(DB_FILE)).await;
    let decrypted = decrypt(&first, &a);
    assert_eq!(decrypted["data"]["password"], b64("s3cr3t-hunter-2718"));
    assert_eq!(decrypted["data"]["user"], b64("admin"));
    let config = wait("the sops configuration", || {
        read("clusters/prod/.sops.yaml")
    })
    .await;
    assert!(config.contains(&ra), "{config}");
    let keyed = wait(
        "the Secret of the destination with a recipients Secret",
        || read("clusters/keyed/core/v1/secrets/shop/db.sops.yaml"),
    )
    .await;
    decrypt(&keyed, &a);

    // Destinations without (usable) encryption: a condition, and not a single Secret file.
    let message = wait_for_skipped(&client, "secrets-plain", "EncryptionNotConfigured").await;
    assert!(message.contains("no plaintext Secret"), "{message}");
    let message = wait_for_skipped(&client, "secrets-bad", "InvalidRecipients").await;
    assert!(message.contains("recipient #1"), "{message}");
    assert!(
        !message.contains("AGE-SECRET-KEY"),
        "no key material in conditions: {message}"
    );
    assert_eq!(
        condition(
            &client,
            "ClusterWatchRule",
            None,
            "secrets-prod",
            "SecretsSkipped"
        )
        .await,
        None
    );

    // 2. Updated: re-encrypted with the new value.
    secrets
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"password": b64("r0tated-hunter-3141")}})),
        )
        .await
        .unwrap();
    let rotated = b64("r0tated-hunter-3141");
    wait("the rotated password", || {
        read(DB_FILE).filter(|y| decrypt(y, &a)["data"]["password"] == rotated.as_str())
    })
    .await;

    // 3. Created and deleted: the file comes and goes.
    cluster.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: api, namespace: shop}\ndata: {token: YXBpLXQwa2VuLTE2MTg=}\n")
        .await;
    wait("the api Secret", || read(API_FILE)).await;
    secrets
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    wait("the api Secret to go", || {
        read(API_FILE).is_none().then_some(())
    })
    .await;

    // 4. A huge Secret is refused with a clear error; the agent keeps running and writing.
    // A real API server caps a Secret's data at 1 MiB, below the agent's plaintext limit, so the Secret is
    // made too large to encrypt the way a real one can be: 40 000 tiny keys, each of which encryption
    // inflates to an `ENC[…]` value, give an encrypted document above the agent's limit.
    let huge: String = (0..40_000).map(|i| format!("k{i:05}: YQ==, ")).collect();
    cluster
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: huge, namespace: shop}}\ndata: {{{huge}}}\n"
        ))
        .await;
    cluster.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after-huge, namespace: shop}\ndata: {k: v}\n")
        .await;
    wait("a ConfigMap after the huge Secret", || {
        read("clusters/prod/core/v1/configmaps/shop/after-huge.yaml")
    })
    .await;
    assert!(read("clusters/prod/core/v1/secrets/shop/huge.sops.yaml").is_none());
    agent.settle().await;
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        log.contains("cannot encrypt object"),
        "the huge Secret is reported"
    );

    // 5. A recipients Secret that disappears: condition, the existing file stays, nothing new is sent.
    Api::<Secret>::namespaced(client.clone(), "gitops-reverser")
        .delete("age-recipients", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_skipped(&client, "secrets-keyed", "RecipientsSecretNotFound").await;
    agent.settle().await;
    assert!(read("clusters/keyed/core/v1/secrets/shop/db.sops.yaml").is_some());

    // 6. Restart over unchanged Secrets: no commit.
    agent.terminate().await;
    let tip = repo.rev_parse(BRANCH);
    let agent = start_agent(&writer_url, &kubeconfig, &agent_log);
    agent.settle().await;
    assert_eq!(
        repo.rev_parse(BRANCH),
        tip,
        "a restart over unchanged Secrets commits nothing"
    );

    // 7. Recipients changed: one re-encryption commit, readable by the new recipient.
    let commits = repo.commit_count(BRANCH);
    let destinations = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        "gitops-reverser",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("configbutler.ai", "v1alpha1", "GitDestination"),
            "gitdestinations",
        ),
    );
    destinations
        .patch(
            "prod",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"encryption": {"age": {"recipients": [ra, rb]}}}})),
        )
        .await
        .unwrap();
    wait("the file re-encrypted to both recipients", || {
        read(DB_FILE).filter(|y| y.contains(&rb))
    })
    .await;
    let both = read(DB_FILE).unwrap();
    decrypt(&both, &a);
    assert_eq!(decrypt(&both, &b)["data"]["password"], rotated.as_str());
    assert!(read("clusters/prod/.sops.yaml").unwrap().contains(&rb));
    agent.settle().await;
    assert_eq!(
        repo.commit_count(BRANCH),
        commits + 1,
        "one re-encryption commit"
    );
    agent.terminate().await;

    // 8. No plaintext anywhere: every blob of every commit, the writer's work dir, every log.
    let files = repo.ls_tree(BRANCH);
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("clusters/plain/core/v1/secrets")),
        "{files:#?}"
    );
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("clusters/bad/core/v1/secrets")),
        "{files:#?}"
    );
    assert!(
        !files
            .iter()
            .any(|f| f.contains("gitops-reverser-fingerprint-")),
        "the agent's own fingerprint keys are never mirrored: {files:#?}"
    );
    let blobs = all_blobs(&repo.path());
    assert!(blobs.len() > 5);
    let mut work_files = Vec::new();
    files_under(writer_dir.path(), &mut work_files);
    assert!(!work_files.is_empty());
    let agent_log = std::fs::read(&agent_log).unwrap();
    let writer_log = logs.0.lock().unwrap().clone();
    for needle in needles() {
        for (path, blob) in &blobs {
            assert!(!blob.contains(&needle), "plaintext in the blob of {path}");
        }
        for file in &work_files {
            let bytes = std::fs::read(file).unwrap_or_default();
            assert!(
                !contains(&bytes, &needle),
                "plaintext in the writer's {}",
                file.display()
            );
        }
        assert!(
            !contains(&agent_log, &needle),
            "plaintext in the agent's log"
        );
        assert!(
            !contains(&writer_log, &needle),
            "plaintext in the writer's log"
        );
    }
    writer.stop().await.unwrap();
    cluster.shutdown().await;
}
