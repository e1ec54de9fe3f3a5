//! A standalone writer serving several clients (`--config`), over real mTLS with rcgen certificates: each client
//! certificate identity writes only where its grant allows, handshakes without a trusted, valid certificate are
//! refused, a client removed from the configuration is cut off after the reload, a flooding client does not stop
//! the others, and the server certificate rotates without a restart. The scripted agents speak the real
//! `Writer.Sync` protocol; two real agents against two emulated clusters are in
//! `agent/tests/multicluster_e2e.rs`.
//!
//! Waits have generous upper bounds only to turn a hang into a failure; no test asserts on durations.

mod support;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    date_time_ymd,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use reverser_proto::v1::{
    self as pb, agent_message::Kind as In, writer_admin_client::WriterAdminClient,
    writer_message::Kind as Out,
};
use support::*;
use testkit::BareRepo;

const PROD: &str = "spiffe://test.example/cluster/prod";
const STAGING: &str = "agent.staging.test.example";
const OPS: &str = "ops-admin";
const GREEDY: &str = "greedy";

struct Pki {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_pem: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A client certificate: URI SANs (`scheme://…`), DNS SANs, else only a CN.
fn client_cert(issuer: &CertifiedIssuer<'static, KeyPair>, identity: &str) -> (String, String) {
    let mut params = CertificateParams::default();
    if identity.contains("://") {
        params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    } else if identity.contains('.') {
        params.subject_alt_names = vec![SanType::DnsName(identity.try_into().unwrap())];
    }
    params.distinguished_name.push(DnType::CommonName, identity);
    let key = KeyPair::generate().unwrap();
    (
        params.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let issuer = ca("agents and writer CA");
        let ca_pem = issuer.pem();
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).unwrap();
        let pki = Pki {
            dir,
            issuer,
            ca_pem,
        };
        pki.rotate_server_cert();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a new server certificate and key (same CA); returns the certificate's PEM.
    fn rotate_server_cert(&self) -> String {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        // Key first, then certificate: a reload between the two writes sees a mismatch and keeps the old pair.
        std::fs::write(self.path("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(self.path("tls.crt"), &cert).unwrap();
        cert
    }

    fn client(&self, identity: &str) -> (String, String) {
        client_cert(&self.issuer, identity)
    }

    fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path("writer.yaml");
        // Write-then-rename so that a reload never reads half a file.
        std::fs::write(self.path("writer.yaml.tmp"), text).unwrap();
        std::fs::rename(self.path("writer.yaml.tmp"), &path).unwrap();
        path
    }
}

/// The configuration: prod and staging on one repository, an admin, and a client granted all of `clusters`.
fn config(repo_url: &str, limits: &str, with_staging: bool) -> String {
    let staging = if with_staging {
        format!(
            "  - identity: {STAGING}\n    clusterNames: [cluster-uid-b]\n    grants:\n      - {{repos: ['{repo_url}'], branches: [main], baseFolders: [clusters/staging]}}\n"
        )
    } else {
        String::new()
    };
    format!(
        "tls: {{cert: tls.crt, key: tls.key, clientCA: ca.crt}}
reloadIntervalSec: 0.1
limits: {{{limits}}}
clients:
  - identity: {PROD}
    clusterNames: [cluster-uid-a]
    grants:
      - {{repos: ['{repo_url}'], branches: [main], baseFolders: [clusters/prod]}}
{staging}  - identity: {GREEDY}
    clusterNames: [cluster-uid-a, cluster-uid-c]
    grants:
      - {{repos: ['{repo_url}'], branches: [main], baseFolders: [clusters]}}
  - identity: {OPS}
    clusterNames: [none]
    admin: true
    grants:
      - {{repos: ['{repo_url}'], branches: [main], baseFolders: [scratch]}}
"
    )
}

async fn start_writer(pki: &Pki, config_text: &str) -> Writer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = pki.write_config(config_text).display().to_string();
    Writer::start(&["--config", &path]).await
}

fn addr(writer: &Writer) -> SocketAddr {
    writer.running.as_ref().unwrap().grpc_addr
}

fn tls_for(pki: &Pki, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

async fn channel(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A scripted agent with `identity`'s certificate that said hello as cluster `uid` (its name is `cluster-{uid}`).
async fn agent_as(pki: &Pki, writer: &Writer, identity: &str, uid: &str) -> Agent {
    let (cert, key) = pki.client(identity);
    let channel = channel(addr(writer), tls_for(pki, Some((&cert, &key))))
        .await
        .expect("mTLS handshake");
    let mut agent = Agent::over(channel, uid).await;
    agent.send(hello(uid)).await;
    agent
        .expect(|m| matches!(m, Out::Welcome(_)), "welcome")
        .await;
    agent
}

fn destination_with_token(key: &str, repo_url: &str, base_folder: &str) -> pb::AgentMessage {
    let mut message = destination(key, repo_url, "main", base_folder, false);
    if let Some(In::Destination(d)) = &mut message.kind {
        d.credentials = Some(pb::Credentials {
            kind: Some(pb::credentials::Kind::Token("agent-token".into())),
        });
    }
    message
}

/// The next reply that is a Reject or a DestinationStatus for `key` with reason `reason`.
async fn refused(agent: &mut Agent, key: &str, reason: &str) -> String {
    match agent
        .expect(
            |m| matches!(m, Out::Reject(r) if r.destination == key && r.reason == reason),
            reason,
        )
        .await
    {
        Out::Reject(r) => r.message,
        _ => unreachable!(),
    }
}

/// Waits until the stream ends and returns its final status (None when it ended cleanly).
async fn stream_end(agent: &mut Agent) -> Option<tonic::Status> {
    loop {
        match agent.next().await {
            Some(Ok(message)) => agent.seen.push(message),
            Some(Err(status)) => return Some(status),
            None => return None,
        }
    }
}

fn all_commit_messages(repo: &BareRepo) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["log", "--format=%B%x00", "main"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Prod and staging connected with their own certificates, each with its destination declared in its own folder.
async fn prod_and_staging(pki: &Pki, writer: &Writer, url: &str) -> (Agent, Agent) {
    let mut prod = agent_as(pki, writer, PROD, "uid-a").await;
    let mut staging = agent_as(pki, writer, STAGING, "uid-b").await;
    prod.declare("gitops/prod", url, "main", "clusters/prod")
        .await;
    staging
        .declare("gitops/staging", url, "main", "clusters/staging")
        .await;
    (prod, staging)
}

#[tokio::test]
async fn each_client_writes_only_inside_its_grant() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = start_writer(&pki, &config(&url, "", true)).await;

    let (mut prod, mut staging) = prod_and_staging(&pki, &writer, &url).await;
    // Both clusters write concurrently into their own base folders.
    prod.send(upsert(
        "gitops/prod",
        1,
        "core/v1/configmaps/shop/a.yaml",
        &configmap("shop", "a", "prod"),
    ))
    .await;
    staging
        .send(upsert(
            "gitops/staging",
            1,
            "core/v1/configmaps/shop/a.yaml",
            &configmap("shop", "a", "staging"),
        ))
        .await;
    prod.ack("gitops/prod", 1).await;
    staging.ack("gitops/staging", 1).await;
    assert!(
        repo.read("main", "clusters/prod/core/v1/configmaps/shop/a.yaml")
            .unwrap()
            .contains("prod")
    );
    assert!(
        repo.read("main", "clusters/staging/core/v1/configmaps/shop/a.yaml")
            .unwrap()
            .contains("staging")
    );
    let messages = all_commit_messages(&repo);
    assert!(
        messages.contains("X-ConfigButler-ClusterUID: uid-a"),
        "{messages}"
    );
    assert!(
        messages.contains("X-ConfigButler-ClusterUID: uid-b"),
        "{messages}"
    );
    let tip = repo.rev_parse("main");
    let files = repo.ls_tree("main");

    // Prod forging a destination into staging's folder, its repository with another branch, or a folder that
    // contains staging's: Forbidden, and its messages for that key are unknown.
    prod.send(destination(
        "gitops/forged",
        &url,
        "main",
        "clusters/staging",
        false,
    ))
    .await;
    let message = refused(&mut prod, "gitops/forged", "Forbidden").await;
    assert!(message.contains("clusters/staging"), "{message}");
    let status = prod.status("gitops/forged", "Ready").await;
    assert_eq!(
        (status.status.as_str(), status.reason.as_str()),
        ("False", "Forbidden")
    );
    prod.send(destination(
        "gitops/other-branch",
        &url,
        "dev",
        "clusters/prod",
        false,
    ))
    .await;
    refused(&mut prod, "gitops/other-branch", "Forbidden").await;
    prod.send(upsert(
        "gitops/forged",
        1,
        "core/v1/configmaps/shop/a.yaml",
        &configmap("shop", "a", "evil"),
    ))
    .await;
    refused(&mut prod, "gitops/forged", "UnknownDestination").await;
    prod.send(snapshot_begin(
        "gitops/forged",
        2,
        scope("", "v1", "configmaps", "shop"),
        1,
    ))
    .await;
    refused(&mut prod, "gitops/forged", "UnknownDestination").await;
    // A path climbing out of its own base folder.
    prod.send(upsert(
        "gitops/prod",
        2,
        "../staging/core/v1/configmaps/shop/a.yaml",
        &configmap("shop", "a", "evil"),
    ))
    .await;
    assert_eq!(prod.reject(2).await.reason, "InvalidPath");
    // Its own Git credentials are not allowed for this client (and the writer has none for the repository).
    prod.send(destination_with_token(
        "gitops/with-token",
        &url,
        "clusters/prod/sub",
    ))
    .await;
    let message = refused(&mut prod, "gitops/with-token", "Forbidden").await;
    assert!(message.contains("allowAgentCredentials"), "{message}");
    assert!(
        !message.contains("agent-token"),
        "credentials never echo: {message}"
    );
    // WriterAdmin is for admins only.
    let (cert, key) = pki.client(PROD);
    let denied = WriterAdminClient::new(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    )
    .list_destinations(pb::ListDestinationsRequest {})
    .await
    .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let (cert, key) = pki.client(OPS);
    let listed = WriterAdminClient::new(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    )
    .list_destinations(pb::ListDestinationsRequest {})
    .await
    .expect("an admin lists destinations")
    .into_inner();
    assert_eq!(listed.destinations.len(), 2);

    // A client granted all of `clusters` still cannot overlap base folders others hold on the branch, nor take
    // over prod's destination by claiming prod's cluster (which its grant allows).
    let mut greedy = agent_as(&pki, &writer, GREEDY, "uid-c").await;
    greedy
        .send(destination("gitops/all", &url, "main", "clusters", false))
        .await;
    refused(&mut greedy, "gitops/all", "OverlappingBaseFolder").await;
    let mut impostor = agent_as(&pki, &writer, GREEDY, "uid-a").await;
    impostor
        .send(destination(
            "gitops/prod",
            &url,
            "main",
            "clusters/prod",
            false,
        ))
        .await;
    let message = refused(&mut impostor, "gitops/prod", "Forbidden").await;
    assert!(message.contains("another client"), "{message}");

    // Claiming a cluster the grant does not list ends the stream.
    let (cert, key) = pki.client(PROD);
    let mut liar = Agent::over(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
        "uid-b",
    )
    .await;
    liar.send(hello("uid-b")).await;
    let status = stream_end(&mut liar).await.expect("an error status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(
        liar.seen
            .iter()
            .any(|m| matches!(m, Out::Reject(r) if r.reason == "Forbidden"))
    );

    // Prod's and staging's destinations still work; nothing above changed the repository.
    prod.send(upsert(
        "gitops/prod",
        3,
        "core/v1/configmaps/shop/b.yaml",
        &configmap("shop", "b", "prod"),
    ))
    .await;
    prod.ack("gitops/prod", 3).await;
    let mut after = repo.ls_tree("main");
    after.retain(|f| f != "clusters/prod/core/v1/configmaps/shop/b.yaml");
    assert_eq!(after, files, "only prod's own new file was added");
    assert_ne!(repo.rev_parse("main"), tip);
    assert!(
        repo.read("main", "clusters/staging/core/v1/configmaps/shop/a.yaml")
            .unwrap()
            .contains("staging")
    );
    writer.stop().await;
}

#[tokio::test]
async fn handshakes_without_a_valid_trusted_certificate_and_plaintext_are_refused() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let writer = start_writer(&pki, &config(&repo.file_url(), "", true)).await;
    let addr = addr(&writer);

    let foreign = ca("someone else's CA");
    let (foreign_cert, foreign_key) = client_cert(&foreign, PROD);
    let (expired_cert, expired_key) = {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(PROD.try_into().unwrap())];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().unwrap();
        (
            params.signed_by(&key, &pki.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let cases = [
        ("no client certificate", tls_for(&pki, None)),
        (
            "another CA",
            tls_for(&pki, Some((&foreign_cert, &foreign_key))),
        ),
        (
            "expired",
            tls_for(&pki, Some((&expired_cert, &expired_key))),
        ),
    ];
    for (what, tls) in cases {
        let refused = match channel(addr, tls).await {
            Err(_) => true,
            Ok(channel) => WriterAdminClient::new(channel)
                .list_workers(pb::ListWorkersRequest {})
                .await
                .is_err(),
        };
        assert!(refused, "{what}: must be refused at the handshake");
    }
    // Plaintext gRPC against the TLS port.
    if let Ok(plain) = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
    {
        assert!(
            WriterAdminClient::new(plain)
                .list_workers(pb::ListWorkersRequest {})
                .await
                .is_err(),
            "plaintext must be refused"
        );
    }
    // A valid certificate from the CA whose identity is not configured: TLS works, the writer refuses it.
    let (cert, key) = pki.client("stranger.test.example");
    let mut client = reverser_proto::v1::writer_client::WriterClient::new(
        channel(addr, tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    );
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    let status = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("an unknown identity is refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    // The configured client still gets through.
    let mut prod = agent_as(&pki, &writer, PROD, "uid-a").await;
    prod.declare("gitops/prod", &repo.file_url(), "main", "clusters/prod")
        .await;
    writer.stop().await;
}

#[tokio::test]
async fn a_client_removed_from_the_configuration_is_cut_off_after_the_reload() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = start_writer(&pki, &config(&url, "", true)).await;
    let (mut prod, mut staging) = prod_and_staging(&pki, &writer, &url).await;

    // A broken configuration is refused and the old one stays: both keep working.
    pki.write_config("clients: [{identity: x, oops: 1}]\n");
    tokio::time::sleep(Duration::from_secs(1)).await;
    staging
        .send(upsert(
            "gitops/staging",
            1,
            "core/v1/configmaps/shop/a.yaml",
            &configmap("shop", "a", "1"),
        ))
        .await;
    staging.ack("gitops/staging", 1).await;

    // Staging is removed: its open stream ends with PermissionDenied, prod's continues.
    pki.write_config(&config(&url, "", false));
    let status = stream_end(&mut staging).await.expect("an error status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    prod.send(upsert(
        "gitops/prod",
        1,
        "core/v1/configmaps/shop/a.yaml",
        &configmap("shop", "a", "1"),
    ))
    .await;
    prod.ack("gitops/prod", 1).await;

    // Reconnecting does not help: the TLS handshake works (same CA), the stream is refused.
    let (cert, key) = pki.client(STAGING);
    let mut client = reverser_proto::v1::writer_client::WriterClient::new(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    );
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    let status = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        repo.read("main", "clusters/staging/core/v1/configmaps/shop/a.yaml")
            .unwrap(),
        configmap("shop", "a", "1"),
        "what was pushed before stays"
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_flooding_client_does_not_stop_the_others_commits() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let limits = "maxStreamsPerClient: 2, messagesPerSecond: 50, messageBurst: 20";
    let writer = start_writer(&pki, &config(&url, limits, true)).await;
    let mut staging = agent_as(&pki, &writer, STAGING, "uid-b").await;
    staging
        .declare("gitops/staging", &url, "main", "clusters/staging")
        .await;

    // Prod floods on its own stream: far more upserts than its rate allows during this test, sent as fast as
    // the stream takes them; a reader records the highest ack.
    const FLOOD: u64 = 100_000;
    let (cert, key) = pki.client(PROD);
    let mut client = reverser_proto::v1::writer_client::WriterClient::new(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    );
    let (sender, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(64);
    sender.send(hello("uid-a")).await.unwrap();
    sender
        .send(destination(
            "gitops/prod",
            &url,
            "main",
            "clusters/prod",
            false,
        ))
        .await
        .unwrap();
    let mut replies = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("prod's stream opens")
        .into_inner();
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Ok(Some(reply)) = replies.message().await {
                if let Some(Out::Ack(ack)) = reply.kind {
                    acked.fetch_max(ack.sequence, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let flood = tokio::spawn(async move {
        for sequence in 1..=FLOOD {
            let name = format!("cm-{sequence}");
            let message = upsert(
                "gitops/prod",
                sequence,
                &format!("core/v1/configmaps/flood/{name}.yaml"),
                &configmap("flood", &name, "x"),
            );
            if sender.send(message).await.is_err() {
                break;
            }
        }
    });
    // Meanwhile staging's changes keep landing.
    for sequence in 1..=3u64 {
        let name = format!("s{sequence}");
        staging
            .send(upsert(
                "gitops/staging",
                sequence,
                &format!("core/v1/configmaps/shop/{name}.yaml"),
                &configmap("shop", &name, "1"),
            ))
            .await;
        staging.ack("gitops/staging", sequence).await;
        assert!(
            repo.read(
                "main",
                &format!("clusters/staging/core/v1/configmaps/shop/{name}.yaml")
            )
            .is_some()
        );
    }
    // The flood was throttled, not refused and not served in full.
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "prod's flood made no progress at all"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        acked < FLOOD,
        "the flood was rate limited (acked up to {acked})"
    );
    assert!(
        !flood.is_finished(),
        "the flooding client is still held back"
    );

    // A third concurrent stream of the same identity is refused (limit 2).
    let _second = agent_as(&pki, &writer, PROD, "uid-a").await;
    let (cert, key) = pki.client(PROD);
    let mut client = reverser_proto::v1::writer_client::WriterClient::new(
        channel(addr(&writer), tls_for(&pki, Some((&cert, &key))))
            .await
            .unwrap(),
    );
    let (_tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(1);
    let status = client
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("a third stream is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    flood.abort();
    reader.abort();
    writer.stop().await;
}

/// The end-entity certificate the server presents to a fresh handshake.
async fn presented_certificate(pki: &Pki, addr: SocketAddr) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let (cert, key) = pki.client(PROD);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn the_server_certificate_rotates_without_a_restart() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = start_writer(&pki, &config(&url, "", true)).await;
    let first = der_of(&std::fs::read_to_string(pki.path("tls.crt")).unwrap());
    assert_eq!(presented_certificate(&pki, addr(&writer)).await, first);
    let mut prod = agent_as(&pki, &writer, PROD, "uid-a").await;
    prod.declare("gitops/prod", &url, "main", "clusters/prod")
        .await;

    let rotated = der_of(&pki.rotate_server_cert());
    let deadline = tokio::time::Instant::now() + WAIT;
    while presented_certificate(&pki, addr(&writer)).await != rotated {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stream opened before the rotation keeps working, and a new connection works.
    prod.send(upsert(
        "gitops/prod",
        1,
        "core/v1/configmaps/shop/a.yaml",
        &configmap("shop", "a", "1"),
    ))
    .await;
    prod.ack("gitops/prod", 1).await;
    let mut again = agent_as(&pki, &writer, PROD, "uid-a").await;
    again
        .declare("gitops/prod", &url, "main", "clusters/prod")
        .await;

    // A broken certificate is not taken: the rotated one stays in force.
    std::fs::write(
        pki.path("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(presented_certificate(&pki, addr(&writer)).await, rotated);
    again
        .send(upsert(
            "gitops/prod",
            1,
            "core/v1/configmaps/shop/b.yaml",
            &configmap("shop", "b", "1"),
        ))
        .await;
    again.ack("gitops/prod", 1).await;
    writer.stop().await;
}

/// grpcurl (a Go TLS client) with `-cacert`, `-cert`, `-key`, as the README documents for debugging.
fn grpcurl(pki: &Pki, identity: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let (cert, key) = pki.client(identity);
    let name = identity.replace(['/', ':'], "_");
    let (cert_path, key_path) = (
        pki.path(&format!("{name}.crt")),
        pki.path(&format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let mut child = std::process::Command::new(tool("grpcurl"))
        .arg("-cacert")
        .arg(pki.path("ca.crt"))
        .arg("-cert")
        .arg(&cert_path)
        .arg("-key")
        .arg(&key_path)
        .args(["-servername", "localhost"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn grpcurl_with_a_client_certificate_reaches_admin_and_is_refused_outside_the_grant() {
    let pki = Pki::new();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = start_writer(&pki, &config(&url, "", true)).await;
    let target = addr(&writer).to_string();
    let pki = Arc::new(pki);

    let (p, t) = (pki.clone(), target.clone());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        grpcurl(&p, OPS, &[&t, "reverser.v1.WriterAdmin/ListWorkers"], "")
    })
    .await
    .unwrap();
    assert!(ok, "an admin lists workers: {stderr}");
    assert!(stdout.trim().starts_with('{'), "{stdout}");

    let (p, t) = (pki.clone(), target.clone());
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        grpcurl(&p, PROD, &[&t, "reverser.v1.WriterAdmin/ListWorkers"], "")
    })
    .await
    .unwrap();
    assert!(!ok && stderr.contains("PermissionDenied"), "{stderr}");

    // Prod speaking the agent protocol by hand, declaring staging's folder.
    let script = format!(
        "{{\"hello\": {{\"clusterUid\": \"uid-a\", \"clusterName\": \"cluster-uid-a\", \"instanceId\": \"me\", \"controllerNamespace\": \"gitops-reverser\", \"controllerName\": \"debug\", \"protocolVersion\": 1}}}}\n{{\"destination\": {{\"key\": \"debug/forged\", \"repoUrl\": \"{url}\", \"branch\": \"main\", \"baseFolder\": \"clusters/staging\"}}}}\n"
    );
    let (p, t) = (pki.clone(), target.clone());
    let (_, stdout, stderr) = tokio::task::spawn_blocking(move || {
        grpcurl(
            &p,
            PROD,
            &["-d", "@", &t, "reverser.v1.Writer/Sync"],
            &script,
        )
    })
    .await
    .unwrap();
    assert!(stdout.contains("\"Forbidden\""), "{stdout} {stderr}");
    assert!(repo.rev_parse("main").is_none(), "nothing was pushed");
    writer.stop().await;
}
