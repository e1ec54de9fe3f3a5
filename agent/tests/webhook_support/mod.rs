//! Shared helpers of the `webhook_*` tests: the API-server corpus with its placeholders
//! filled in, the content hash exactly as ingestion computes it for a watch event, an rcgen
//! PKI written to files, and a small HTTPS client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube::api::DynamicObject;
use reverser_agent::canonical;
use reverser_agent::webhook::{
    self, AttributionMetrics, FactStore, FactsConfig, ManualClock, WebhookConfig, WebhookHandle,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Upper bound on any wait, only to turn a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn corpus_dir() -> PathBuf {
    testkit::manifest_dir().join("../tests/fixtures/apiserver-corpus")
}

/// A corpus file as JSON, every placeholder replaced by a deterministic value: the same
/// placeholder gets the same value in every file, so `<uid-1>` of an admission request and of
/// its watch event stay equal.
pub fn corpus(rel: &str) -> Value {
    let path = corpus_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: Value = serde_saphyr::from_str(&text).expect("corpus YAML");
    substitute(value)
}

fn substitute(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(fill(&s)),
        Value::Array(items) => Value::Array(items.into_iter().map(substitute).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (fill(&k), substitute(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `<uid-3>` → a UUID ending in 3, `<rv-3>` → `"3"`, `<ts>` → a fixed RFC 3339 time,
/// anything else (`<ns-1>`, `<rand-1>`) → the name without brackets.
fn fill(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        out.push_str(&rest[..start]);
        let inner = &rest[start + 1..start + len];
        let (name, n) = inner.rsplit_once('-').unwrap_or((inner, ""));
        match name {
            "ts" if n.is_empty() => out.push_str("2026-06-25T10:00:00Z"),
            "uid" => out.push_str(&format!("00000000-0000-4000-8000-{n:0>12}")),
            "rv" => out.push_str(n),
            _ => out.push_str(inner),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// A corpus admission file (`request:` only) wrapped into a full AdmissionReview body.
pub fn review_body(rel: &str) -> Vec<u8> {
    review_of(corpus(rel)["request"].clone())
}

pub fn review_of(request: Value) -> Vec<u8> {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
        .to_string()
        .into_bytes()
}

/// What ingestion derives from a watch event's object: kube's watcher decodes it as a
/// `DynamicObject`, ingestion sets apiVersion/kind, renders canonical YAML and hashes it.
pub struct Watched {
    pub key: reverser_agent::attribution::ObjectKey,
    pub uid: String,
    pub hash: [u8; 32],
}

pub fn watched(group: &str, resource: &str, object: &Value) -> Watched {
    let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("a k8s object");
    let uid = dynamic.metadata.uid.clone().unwrap_or_default();
    let key = reverser_agent::attribution::ObjectKey::new(
        group,
        resource,
        dynamic.metadata.namespace.as_deref().unwrap_or(""),
        dynamic.metadata.name.as_deref().unwrap_or(""),
    );
    let json = serde_json::to_value(dynamic).unwrap();
    let hash = canonical::content_hash(&canonical::to_canonical_yaml(&json).unwrap());
    Watched { key, uid, hash }
}

/// Feeds one watch event (`{"type": ..., "object": ...}`) to the store, as ingestion would:
/// ADDED/MODIFIED join on content (with the lineage of the object's resourceVersion), DELETED
/// on uid.
pub fn feed(store: &FactStore, group: &str, resource: &str, event: &Value) -> Option<String> {
    let w = watched(group, resource, &event["object"]);
    match event["type"].as_str() {
        Some("ADDED") | Some("MODIFIED") => {
            store.attribute_watched(&w.key, &event["object"], &w.hash)
        }
        Some("DELETED") => store.attribute_delete(&w.key, &w.uid),
        other => panic!("not a change event: {other:?}"),
    }
}

/// A store on a manual clock, with fresh metrics.
pub fn manual_store(config: FactsConfig) -> (FactStore, ManualClock) {
    let clock = ManualClock::default();
    let store = FactStore::with_clock(
        config,
        AttributionMetrics::new().unwrap(),
        Arc::new(clock.clone()),
    );
    (store, clock)
}

/// A CA and a server certificate for 127.0.0.1/localhost, written as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
    /// DER of the leaf certificate currently in the files.
    pub leaf_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "webhook test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let mut pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_pem: ca.pem(),
            ca,
            leaf_der: Vec::new(),
        };
        pki.issue("first");
        pki
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Issues a new leaf (new key) and rewrites both files, as a certificate rotation does.
    pub fn issue(&mut self, common_name: &str) {
        let (cert_pem, key_pem, der) = self.leaf(common_name);
        std::fs::write(self.cert_file(), cert_pem).unwrap();
        std::fs::write(self.key_file(), key_pem).unwrap();
        self.leaf_der = der;
    }

    /// A new leaf without writing it: (certificate PEM, key PEM, certificate DER).
    pub fn leaf(&self, common_name: &str) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

pub struct Server {
    pub handle: WebhookHandle,
    pub store: FactStore,
    pub pki: Pki,
}

impl Server {
    /// A webhook on 127.0.0.1:0 with `tweak` applied to its config.
    pub async fn start(tweak: impl FnOnce(&mut WebhookConfig)) -> Server {
        let pki = Pki::new();
        let store = FactStore::new(FactsConfig::default(), AttributionMetrics::new().unwrap());
        let mut config = WebhookConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            pki.cert_file(),
            pki.key_file(),
        );
        tweak(&mut config);
        let handle = webhook::spawn(config, store.clone()).await.unwrap();
        Server { handle, store, pki }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }
}

/// A client certificate chain and its key, PEM.
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA for client certificates (as the one signing kube-apiserver's webhook client certificate).
pub struct ClientCa {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

impl ClientCa {
    pub fn new(name: &str) -> ClientCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        ClientCa {
            ca_pem: ca.pem(),
            ca,
        }
    }

    /// A client certificate with subject CN `common_name` and the DNS SANs `dns`.
    pub fn issue(&self, common_name: &str, dns: &[&str]) -> ClientIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        ClientIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A TLS connection trusting only `ca_pem`, offering `alpn`.
pub async fn tls_connect(addr: SocketAddr, ca_pem: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    tls_connect_as(addr, ca_pem, alpn, None)
        .await
        .expect("TLS handshake")
}

/// As [`tls_connect`], presenting `identity` when given; the handshake's error otherwise.
pub async fn tls_connect_as(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<&ClientIdentity>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        let cert: CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => config.with_no_client_auth(),
        Some(id) => {
            use rustls::pki_types::PrivateKeyDer;
            use rustls::pki_types::pem::PemObject;
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            config.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    // As any HTTP client does; without it Nagle + delayed ACKs add 40 ms stalls to HTTP/2.
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
}

/// The leaf certificate the server presented on `tls`.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP/1.1 request over a fresh TLS connection.
pub async fn request(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Bytes) {
    let tls = tls_connect(addr, ca_pem, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("response in time")
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, bytes)
}

pub async fn post(addr: SocketAddr, ca_pem: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
    request(addr, ca_pem, "POST", webhook::PATH, body).await
}
