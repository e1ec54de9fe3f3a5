//! TLS for the gRPC server with reload: tonic's `ServerTlsConfig` is fixed at start, so the writer builds its own
//! rustls `ServerConfig` whose certificate resolver and client-certificate verifier are swappable
//! (`reverser_common::tls`, replaced when the writer reloads its files, never following them alone), accepts
//! connections itself (tokio-rustls) and hands tonic a stream of established connections
//! (`Server::serve_with_incoming`). Each connection carries the identity of its verified client certificate
//! ([`ConnInfo`], a request extension) for [`crate::authz`].
//!
//! Rotation: [`ReloadableTls::update`] swaps the server certificate and the client CA; new handshakes use them,
//! established connections keep going. Only the `ring` crypto provider is used.

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

pub use reverser_common::tls::TlsError;
use reverser_common::tls::{ReloadingCert, ReloadingClientCa, certified_key, client_verifier};
use rustls::{
    ServerConfig, crypto::CryptoProvider, server::danger::ClientCertVerifier, sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info};

/// The TLS files of the gRPC server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA bundle (mTLS).
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate, key and client verifier read from [`TlsPaths`].
pub struct TlsMaterial {
    certified: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl TlsMaterial {
    /// Reads and checks the files (the key must match the certificate; the CA bundle must hold a CA).
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let provider = provider();
        let certified = certified_key(&paths.cert, &paths.key, &provider)?;
        let verifier = paths
            .client_ca
            .as_ref()
            .map(|ca| client_verifier(ca, &provider))
            .transpose()?;
        Ok(Self {
            certified: Arc::new(certified),
            verifier,
        })
    }
}

/// A rustls server configuration whose certificate and client CA can be replaced while it serves.
pub struct ReloadableTls {
    cert: Arc<ReloadingCert>,
    verifier: Option<Arc<ReloadingClientCa>>,
    config: Arc<ServerConfig>,
}

impl ReloadableTls {
    pub fn new(material: TlsMaterial) -> Result<Self, TlsError> {
        let cert = Arc::new(ReloadingCert::new(material.certified));
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let (builder, verifier) = match material.verifier {
            Some(verifier) => {
                let slot = Arc::new(ReloadingClientCa::new(verifier));
                (builder.with_client_cert_verifier(slot.clone()), Some(slot))
            }
            None => (builder.with_no_client_auth(), None),
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session skips the client-certificate verifier, so an expired
        // certificate or one whose CA a reload removed would keep being accepted. Full handshakes only.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            cert,
            verifier,
            config: Arc::new(config),
        })
    }

    /// Swaps in new material; new handshakes use it. Turning mTLS on or off needs a restart.
    pub fn update(&self, material: TlsMaterial) -> Result<(), TlsError> {
        match (&self.verifier, material.verifier) {
            (Some(slot), Some(verifier)) => slot.replace(verifier),
            (None, None) => {}
            _ => {
                return Err(TlsError::Invalid(
                    "turning client certificates (clientCA) on or off needs a restart".into(),
                ));
            }
        }
        self.cert.replace(material.certified);
        Ok(())
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }
}

/// The client identity of a certificate: its first URI SAN, else its first DNS SAN, else its subject CN.
pub fn identity_of(der: &[u8]) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        if let Some(name) = uri.or(dns).filter(|n| !n.is_empty()) {
            return Ok(name.to_owned());
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "the client certificate has no URI or DNS SAN and no CN".into())
}

/// What the gRPC service learns about a connection (a request extension).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote_addr: SocketAddr,
    /// The verified client certificate's identity (None without mTLS).
    pub identity: Option<String>,
}

/// An established TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: ConnInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// TLS handshakes in progress at most (see [`incoming`]).
const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// Accepts TCP connections and completes their TLS handshakes (each on its own task, bounded by
/// `handshake_timeout`, so a slow or silent client holds nothing up); yields the established ones. Refused
/// handshakes (no certificate, another CA, expired, plaintext) are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    // Handshakes cost CPU before anyone is authenticated: at most this many at once (a connection flood waits in
    // the listen backlog instead of starving the streams already served).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = sender.closed() => break,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                break;
            };
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(permit);
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        info!(peer = %remote_addr, %error, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        info!(peer = %remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|cert| identity_of(cert.as_ref()));
                let identity = match identity {
                    None => None,
                    Some(Ok(identity)) => Some(identity),
                    Some(Err(error)) => {
                        info!(peer = %remote_addr, %error, "client certificate without a usable identity");
                        None
                    }
                };
                debug!(peer = %remote_addr, identity = identity.as_deref().unwrap_or("-"), "TLS connection");
                let _ = sender
                    .send(Ok(TlsConn {
                        inner: stream,
                        info: ConnInfo {
                            remote_addr,
                            identity,
                        },
                    }))
                    .await;
            });
        }
    });
    ReceiverStream::new(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert_with(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_prefers_uri_then_dns_then_cn() {
        let uri = cert_with(
            vec![
                SanType::DnsName("agent.prod.example".try_into().unwrap()),
                SanType::URI("spiffe://acme/cluster/prod".try_into().unwrap()),
            ],
            Some("cn-prod"),
        );
        assert_eq!(identity_of(&uri).unwrap(), "spiffe://acme/cluster/prod");
        let dns = cert_with(
            vec![SanType::DnsName("agent.prod.example".try_into().unwrap())],
            Some("cn-prod"),
        );
        assert_eq!(identity_of(&dns).unwrap(), "agent.prod.example");
        let cn = cert_with(vec![], Some("cn-prod"));
        assert_eq!(identity_of(&cn).unwrap(), "cn-prod");
        let nothing = cert_with(vec![], None);
        assert!(identity_of(&nothing).is_err());
        assert!(identity_of(b"not a certificate").is_err());
    }

    #[test]
    fn bad_files_are_reported_without_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("other.key"), other.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("garbage"), "hello").unwrap();
        let paths = |cert: &str, key: &str, ca: Option<&str>| TlsPaths {
            cert: dir.path().join(cert),
            key: dir.path().join(key),
            client_ca: ca.map(|c| dir.path().join(c)),
        };
        assert!(TlsMaterial::load(&paths("tls.crt", "tls.key", Some("tls.crt"))).is_ok());
        let mismatch = TlsMaterial::load(&paths("tls.crt", "other.key", None))
            .err()
            .unwrap()
            .to_string();
        assert!(mismatch.contains("do not make a usable"), "{mismatch}");
        assert!(!mismatch.contains("PRIVATE KEY"), "{mismatch}");
        let garbage = TlsMaterial::load(&paths("garbage", "tls.key", None))
            .err()
            .unwrap()
            .to_string();
        assert!(garbage.contains("no CERTIFICATE"), "{garbage}");
        let missing = TlsMaterial::load(&paths("tls.crt", "absent.key", None))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("absent.key"), "{missing}");
        // A reloadable config refuses to switch mTLS on at runtime.
        let tls =
            ReloadableTls::new(TlsMaterial::load(&paths("tls.crt", "tls.key", None)).unwrap())
                .unwrap();
        assert!(
            tls.update(TlsMaterial::load(&paths("tls.crt", "tls.key", Some("tls.crt"))).unwrap())
                .is_err()
        );
    }
}
