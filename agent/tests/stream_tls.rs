//! The stream client over mTLS to the real writer (`--tls-cert`, `--tls-key`, `--tls-client-ca`; certificates
//! from rcgen): a client certificate from the CA gets through, a client without one is refused.

use std::{sync::Arc, time::Duration};

use clap::Parser;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::{mpsc, oneshot};

use reverser_agent::{
    events::{AgentEvent, DestinationDecl, Feedback, ObjectRef},
    stream::{AgentIdentity, StreamClient, StreamConfig, StreamStats, TlsSettings},
};
use reverser_writer::{Args, RunningWriter};
use testkit::BareRepo;

const WAIT: Duration = Duration::from_secs(60);

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "reverser test CA");
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: &[&str]| {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(&["localhost"]);
    let (client_cert, client_key) = leaf(&["agent.cluster-a"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [
        ("ca.crt", issuer.pem()),
        ("tls.crt", server_cert),
        ("tls.key", server_key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    Pki {
        dir,
        ca_pem: issuer.pem(),
        client_cert,
        client_key,
    }
}

async fn mtls_writer(pki: &Pki, work: &std::path::Path) -> RunningWriter {
    let path = |name: &str| pki.dir.path().join(name).display().to_string();
    let (cert, key, ca, work) = (
        path("tls.crt"),
        path("tls.key"),
        path("ca.crt"),
        work.display().to_string(),
    );
    let argv = [
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
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    Args::try_parse_from(argv)
        .unwrap()
        .start()
        .await
        .expect("writer starts")
}

fn config(writer: &RunningWriter, tls: TlsSettings) -> StreamConfig {
    let identity = AgentIdentity {
        cluster_uid: "uid-1".into(),
        cluster_name: "test".into(),
        instance_id: "agent-0".into(),
        controller_namespace: "gitops-reverser".into(),
        controller_name: "reverser".into(),
    };
    let mut config = StreamConfig::new(format!("https://{}", writer.grpc_addr), identity);
    config.tls = Some(tls);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

fn events(repo_url: &str) -> [AgentEvent; 2] {
    [
        AgentEvent::Destination(DestinationDecl {
            key: "gitops/prod".into(),
            repo_url: repo_url.into(),
            branch: "main".into(),
            base_folder: "c".into(),
            exclusive_mode: false,
            credentials_reference: None,
            credentials: None,
            encryption: None,
            prune: Default::default(),
            commit_message: None,
            suspend: false,
            placement: Default::default(),
        }),
        AgentEvent::Upsert {
            destination: "gitops/prod".into(),
            path: "core/v1/configmaps/ns/a.yaml".into(),
            yaml: "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: ns\n".into(),
            object: ObjectRef::default(),
            created: true,
            author: None,
            fingerprint: None,
        },
    ]
}

/// A client fed with some events; the events channel stays open so that it never finishes on its own.
struct Running {
    stats: Arc<StreamStats>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _events: mpsc::Sender<AgentEvent>,
}

impl Running {
    async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("stops on shutdown")
            .unwrap();
    }
}

/// Starts a client, feeds it `events`, and returns its first connection-state feedback.
async fn first_state(config: StreamConfig, events: [AgentEvent; 2]) -> (Feedback, Running) {
    let client = StreamClient::new(config).expect("valid config");
    let stats = client.stats();
    let (events_tx, events_rx) = mpsc::channel(8);
    let (feedback_tx, mut feedback) = mpsc::channel(64);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = client.spawn(events_rx, feedback_tx, async move {
        let _ = stopped.await;
    });
    for event in events {
        events_tx.send(event).await.unwrap();
    }
    let state = loop {
        let next = tokio::time::timeout(WAIT, feedback.recv())
            .await
            .expect("a connection state within the wait")
            .expect("feedback open");
        if matches!(next, Feedback::Connected | Feedback::Disconnected { .. }) {
            break next;
        }
    };
    (
        state,
        Running {
            stats,
            stop,
            task,
            _events: events_tx,
        },
    )
}

#[tokio::test]
async fn mtls_with_a_client_certificate_delivers_and_without_one_is_refused() {
    let pki = pki();
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let writer = mtls_writer(&pki, work.path()).await;
    let tls = TlsSettings {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        client_cert_pem: Some(pki.client_cert.clone().into_bytes()),
        client_key_pem: Some(pki.client_key.clone().into_bytes()),
        // The writer's certificate names localhost, not the address we dial.
        domain: Some("localhost".into()),
    };

    let (state, client) = first_state(config(&writer, tls.clone()), events(&repo.file_url())).await;
    assert_eq!(state, Feedback::Connected);
    tokio::time::timeout(WAIT, async {
        while client.stats.acked() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the upsert is acked");
    assert!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml")
            .is_some()
    );
    client.shutdown().await;

    let without_cert = TlsSettings {
        client_cert_pem: None,
        client_key_pem: None,
        ..tls
    };
    let (state, client) =
        first_state(config(&writer, without_cert), events(&repo.file_url())).await;
    let Feedback::Disconnected { error } = state else {
        panic!("a client without a certificate must be refused, got {state:?}")
    };
    assert!(error.contains("CertificateRequired"), "{error}");
    assert!(!client.stats.connected());
    assert_eq!(
        (client.stats.acked(), client.stats.unacked()),
        (0, 1),
        "kept, never delivered"
    );
    client.shutdown().await;
    writer.stop().await.unwrap();
}
