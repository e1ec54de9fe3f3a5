//! The gRPC server over real TLS: a server certificate, and mTLS with `--tls-client-ca` (certificates from rcgen).

mod support;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use support::*;
use testkit::BareRepo;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert: String,
    client_key: String,
    other_client_cert: String,
    other_client_key: String,
}

fn ca(name: &str) -> (CertifiedIssuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let pem = issuer.pem();
    (issuer, pem)
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, ca_pem) = ca("reverser test CA");
    let (server_cert, server_key) = leaf(&issuer, &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = leaf(&issuer, &["agent.cluster-a"]);
    let (other_issuer, _) = ca("someone else's CA");
    let (other_client_cert, other_client_key) = leaf(&other_issuer, &["agent.intruder"]);
    for (name, pem) in [
        ("ca.crt", &ca_pem),
        ("tls.crt", &server_cert),
        ("tls.key", &server_key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    Pki {
        dir,
        ca_pem,
        client_cert,
        client_key,
        other_client_cert,
        other_client_key,
    }
}

async fn channel(
    addr: std::net::SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn writer_with(pki: &Pki, mtls: bool) -> Writer {
    let path = |name: &str| pki.dir.path().join(name).display().to_string();
    let (cert, key, ca) = (path("tls.crt"), path("tls.key"), path("ca.crt"));
    let mut flags = vec!["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    if mtls {
        flags.extend(["--tls-client-ca", ca.as_str()]);
    }
    Writer::start(&flags).await
}

#[tokio::test]
async fn a_tls_client_trusting_the_ca_lands_a_commit() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = pki();
    let repo = BareRepo::new();
    let writer = writer_with(&pki, false).await;
    let addr = writer.running.as_ref().unwrap().grpc_addr;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("127.0.0.1");
    let mut agent = Agent::over(channel(addr, tls).await.expect("TLS handshake"), "uid-1").await;
    agent.send(hello("uid-1")).await;
    agent
        .declare("gitops/prod", &repo.file_url(), "main", "c")
        .await;
    agent
        .send(upsert(
            "gitops/prod",
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.ack("gitops/prod", 1).await;
    assert!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml")
            .is_some()
    );

    // A plaintext client cannot talk to a TLS server.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let mut client = reverser_proto::v1::writer_admin_client::WriterAdminClient::new(plain);
        assert!(
            client
                .list_workers(reverser_proto::v1::ListWorkersRequest {})
                .await
                .is_err()
        );
    }
    writer.stop().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = pki();
    let writer = writer_with(&pki, true).await;
    let addr = writer.running.as_ref().unwrap().grpc_addr;
    let base = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .domain_name("127.0.0.1")
    };
    let admin =
        |channel: Channel| reverser_proto::v1::writer_admin_client::WriterAdminClient::new(channel);

    let trusted = channel(
        addr,
        base().identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
    )
    .await
    .expect("a client with a certificate from the CA connects");
    admin(trusted)
        .list_workers(reverser_proto::v1::ListWorkersRequest {})
        .await
        .expect("served");

    // No client certificate, or one from another CA: refused at the handshake (connect or first call fails).
    for tls in [
        base(),
        base().identity(Identity::from_pem(
            &pki.other_client_cert,
            &pki.other_client_key,
        )),
    ] {
        let refused = match channel(addr, tls).await {
            Err(_) => true,
            Ok(channel) => admin(channel)
                .list_workers(reverser_proto::v1::ListWorkersRequest {})
                .await
                .is_err(),
        };
        assert!(
            refused,
            "a client without a trusted certificate must be refused"
        );
    }
    writer.stop().await;
}
