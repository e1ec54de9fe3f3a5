//! Two clusters, one standalone writer: two API servers (real kube-apiservers by default, in-process emulators
//! with `REVERSER_E2E_BACKEND=emulator`), each with its own `reverser-agent`
//! binary (a child process with its own client certificate), streaming over mTLS to one writer started with a
//! `--config` file that grants each client certificate only its own base folder of one shared bare repository.
//!
//! ```text
//! cluster prod     ◀── agent (cert spiffe://…/prod) ──┐ mTLS
//!                                                      ├──▶ writer --config ──push──▶ BareRepo: clusters/prod,
//! cluster staging  ◀── agent (cert agent.staging…) ───┘                                        clusters/staging
//! ```
//!
//! Waits have generous upper bounds only to turn a hang into a failure; no test asserts on durations.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use testkit::BareRepo;

mod support;

use support::cluster::TestCluster;
use support::world::{self, Agent, KubeconfigFile, start_writer};
use support::{condition, free_port, wait_async};

const PROD_ID: &str = "spiffe://e2e.example/cluster/prod";
const STAGING_ID: &str = "agent.staging.e2e.example";

fn cluster_objects(name: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: app, namespace: shop}}
data: {{cluster: {name}}}
"
    )
}

/// The agent's configuration in cluster `name`: one destination `clusters/{name}`; with `forge`, a second
/// destination pointing into the other cluster's folder.
fn agent_config(repo_url: &str, name: &str, forge: Option<&str>) -> String {
    let mut text = format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [main]
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: own, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: main
  baseFolder: clusters/{name}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: shop, namespace: shop}}
spec:
  destinationRef: {{name: own, namespace: gitops-reverser}}
  rules: [{{apiGroups: [''], resources: [configmaps]}}]
"
    );
    if let Some(other) = forge {
        text.push_str(&format!(
            "
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: forged, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: main
  baseFolder: clusters/{other}
  accessPolicy: {{namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: forged, namespace: shop}}
spec:
  destinationRef: {{name: forged, namespace: gitops-reverser}}
  rules: [{{apiGroups: [''], resources: [configmaps]}}]
"
        ));
    }
    text
}

fn writer_config(repo_url: &str) -> String {
    format!(
        "tls: {{cert: tls.crt, key: tls.key, clientCA: ca.crt}}
reloadIntervalSec: 0.5
clients:
  - identity: {PROD_ID}
    clusterNames: [prod]
    grants: [{{repos: ['{repo_url}'], branches: [main], baseFolders: [clusters/prod]}}]
  - identity: {STAGING_ID}
    clusterNames: [staging]
    grants: [{{repos: ['{repo_url}'], branches: [main], baseFolders: [clusters/staging]}}]
"
    )
}

struct Pki {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "e2e clusters CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), issuer.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        Pki { dir, issuer }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `{name}.crt` and `{name}.key` for a client identity (a URI SAN or a DNS SAN).
    fn client(&self, name: &str, identity: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![if identity.contains("://") {
            SanType::URI(identity.try_into().unwrap())
        } else {
            SanType::DnsName(identity.try_into().unwrap())
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

struct Cluster {
    cluster: TestCluster,
    _kubeconfig: KubeconfigFile,
    agent: Agent,
}

async fn cluster(
    name: &str,
    identity: &str,
    pki: &Pki,
    repo_url: &str,
    writer: &str,
    forge: Option<&str>,
) -> Cluster {
    let cluster = TestCluster::start().await;
    cluster.apply_dir(&world::crds_dir()).await;
    cluster.apply_yaml(&cluster_objects(name)).await;
    cluster
        .apply_yaml(&agent_config(repo_url, name, forge))
        .await;
    let kubeconfig = KubeconfigFile::write(&cluster, None);
    let (cert, key) = pki.client(name, identity);
    let admin = format!("127.0.0.1:{}", free_port());
    let agent = Agent::spawn(
        Agent::command(writer, &kubeconfig.path, &admin)
            .arg("--writer-ca")
            .arg(pki.path("ca.crt"))
            .arg("--writer-cert")
            .arg(cert)
            .arg("--writer-key")
            .arg(key)
            .args(["--writer-tls-domain", "localhost"])
            .args(["--cluster-name", name])
            .args(["--controller-namespace", "gitops-reverser"])
            .args([
                "--leader-election-lease-sec",
                "3",
                "--leader-election-renew-sec",
                "1",
            ]),
        &admin,
    );
    Cluster {
        cluster,
        _kubeconfig: kubeconfig,
        agent,
    }
}

fn git(repo: &BareRepo, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(args)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The distinct `X-ConfigButler-ClusterUID` trailers of the commits that touched `folder`.
fn cluster_uids_of(repo: &BareRepo, folder: &str) -> Vec<String> {
    let log = git(repo, &["log", "--format=%B", "main", "--", folder]);
    let mut uids: Vec<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix("X-ConfigButler-ClusterUID: "))
        .map(str::to_owned)
        .collect();
    uids.sort();
    uids.dedup();
    uids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_write_their_own_folders_through_one_standalone_writer() {
    world::init();
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let config = pki.path("writer.yaml");
    std::fs::write(&config, writer_config(&url)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let config_arg = config.display().to_string();
    let writer = start_writer("127.0.0.1:0", work.path(), &["--config", &config_arg]).await;
    let writer_url = format!("https://127.0.0.1:{}", writer.grpc_addr.port());

    // Both agents start at once; prod also has a destination forged into staging's folder.
    let (mut prod, mut staging) = tokio::join!(
        cluster("prod", PROD_ID, &pki, &url, &writer_url, Some("staging")),
        cluster("staging", STAGING_ID, &pki, &url, &writer_url, None),
    );

    // Each cluster lands in its own base folder.
    let prod_file = "clusters/prod/core/v1/configmaps/shop/app.yaml";
    let staging_file = "clusters/staging/core/v1/configmaps/shop/app.yaml";
    wait_async("both clusters' ConfigMaps in Git", async || {
        let a = repo.read("main", prod_file)?;
        let b = repo.read("main", staging_file)?;
        (a.contains("cluster: prod") && b.contains("cluster: staging")).then_some(())
    })
    .await;

    // Prod's forged destination is refused by the writer, and the refusal reaches the cluster as a condition.
    let client = prod.cluster.client().await;
    let (_, reason, message) = wait_async("the forged destination's Ready=False", async || {
        condition(
            &client,
            "GitDestination",
            Some("gitops-reverser"),
            "forged",
            "Ready",
        )
        .await
        .filter(|(status, _, _)| status == "False")
    })
    .await;
    assert_eq!(reason, "Forbidden", "{message}");
    let own = wait_async("prod's own destination Ready=True", async || {
        condition(
            &client,
            "GitDestination",
            Some("gitops-reverser"),
            "own",
            "Ready",
        )
        .await
        .filter(|(status, _, _)| status == "True")
    })
    .await;
    assert_eq!(own.0, "True");

    // Commits name their cluster: every commit touching a folder carries that cluster's UID, and they differ.
    let prod_uids = cluster_uids_of(&repo, "clusters/prod");
    let staging_uids = cluster_uids_of(&repo, "clusters/staging");
    assert_eq!(prod_uids.len(), 1, "{prod_uids:?}");
    assert_eq!(staging_uids.len(), 1, "{staging_uids:?}");
    assert_ne!(prod_uids, staging_uids);
    // Nothing of prod's ever landed in staging's folder.
    assert!(
        repo.read("main", staging_file)
            .unwrap()
            .contains("cluster: staging")
    );
    let staging_files: Vec<String> = repo
        .ls_tree("main")
        .into_iter()
        .filter(|f| f.starts_with("clusters/staging/"))
        .collect();
    assert!(
        staging_files.iter().all(|f| f.ends_with("owner.yaml")
            || f.ends_with("/.sourceignore")
            || repo.read("main", f).unwrap().contains("staging")),
        "{staging_files:?}"
    );

    prod.agent.kill().await;
    staging.agent.kill().await;
    writer.stop().await.unwrap();
    prod.cluster.shutdown().await;
    staging.cluster.shutdown().await;
}
