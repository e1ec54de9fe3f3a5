//! A server certificate and a client-certificate CA read from PEM files, swappable while a server runs: the
//! agent's webhook and the writer's gRPC server both serve through [`ReloadingCert`] (a rustls
//! [`ResolvesServerCert`]) and, with client certificates, [`ReloadingClientCa`] (a [`ClientCertVerifier`]).
//!
//! Two ways to change what they serve:
//! - `follow` — the files are checked at every TLS handshake (a `stat` each: modification time, size, inode) and
//!   re-read only when that changed, or while a file was modified in the last two seconds, because a same-size
//!   rewrite within one timestamp tick leaves the metadata unchanged (git's "racy" index entries have the same
//!   problem). Kubernetes rotates a mounted Secret by swapping a symlink, so the leaf can change under a running
//!   process. The agent's webhook uses this.
//! - `replace` — the owner swaps in a value it loaded itself (the writer reloads its TLS files together with its
//!   configuration, all or nothing).
//!
//! Either way a new version that does not load — half-written, or a new certificate with the old key — keeps the
//! previous one in service; a followed file reports it once, not per handshake. Established connections keep
//! going; new handshakes use the current value. Errors name the file, never its content.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::{debug, info, warn};

/// A certificate, key or CA file that does not load.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Reads a certificate chain and its private key; fails when the key does not belong to the certificate (a
/// rotation caught between the two file writes must not be served).
pub fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    parse_certified_key(
        cert_file,
        key_file,
        &read(cert_file)?,
        &read(key_file)?,
        provider,
    )
}

/// A verifier accepting client certificates that chain to the CA bundle in `ca_file`.
pub fn client_verifier(
    ca_file: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    parse_client_verifier(ca_file, &read(ca_file)?, provider)
}

/// The certificate a server presents: one [`CertifiedKey`], replaced by its owner or re-read from followed files.
#[derive(Debug)]
pub struct ReloadingCert {
    label: &'static str,
    current: Mutex<Current<CertifiedKey>>,
}

impl ReloadingCert {
    /// Serves `key` until [`ReloadingCert::replace`].
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self {
            label: "",
            current: Mutex::new(Current {
                value: key,
                files: None,
            }),
        }
    }

    /// Serves the PEM chain and key in the two files, re-read when they change. Loads them now: a server that
    /// cannot present its certificate must not start. `label` names the server in log lines ("webhook").
    pub fn follow(
        label: &'static str,
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let files = Followed::new(vec![cert_file, key_file], provider)?;
        let key = parse_certified_key(
            &files.paths[0],
            &files.paths[1],
            &files.pems[0],
            &files.pems[1],
            &files.provider,
        )?;
        Ok(Self {
            label,
            current: Mutex::new(Current {
                value: Arc::new(key),
                files: Some(files),
            }),
        })
    }

    /// New handshakes present `key`.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        lock(&self.current).value = key;
    }

    /// The certificate to present now, re-reading followed files first if they changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let label = self.label;
        let mut current = lock(&self.current);
        let Current { value, files } = &mut *current;
        if let Some(files) = files {
            files.refresh(value, |files, pems| {
                let (cert_file, key_file) = (&files.paths[0], &files.paths[1]);
                match parse_certified_key(cert_file, key_file, &pems[0], &pems[1], &files.provider) {
                    Ok(key) => {
                        info!(cert = %cert_file.display(), "{label} certificate reloaded");
                        Some(Arc::new(key))
                    }
                    Err(error) => {
                        warn!(%error, "{label} certificate files changed but do not load; serving the previous certificate");
                        None
                    }
                }
            });
        }
        Arc::clone(value)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The client-certificate check: a chain to the current CA bundle (replaced by its owner or re-read from a
/// followed file) and, when `allowed_names` is not empty, one of those names as the certificate's subject CN or a
/// DNS or URI SAN. Client certificates are mandatory.
#[derive(Debug)]
pub struct ReloadingClientCa {
    label: &'static str,
    allowed_names: Vec<String>,
    current: Mutex<Current<dyn ClientCertVerifier>>,
}

impl ReloadingClientCa {
    /// Checks with `verifier` until [`ReloadingClientCa::replace`]; any name is allowed.
    pub fn new(verifier: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            label: "",
            allowed_names: Vec::new(),
            current: Mutex::new(Current {
                value: verifier,
                files: None,
            }),
        }
    }

    /// Checks against the CA bundle in `ca_file`, re-read when it changes. Loads it now: a server told to
    /// authenticate its callers must not start without. `label` names the server in log lines ("webhook").
    pub fn follow(
        label: &'static str,
        ca_file: PathBuf,
        allowed_names: Vec<String>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let files = Followed::new(vec![ca_file], provider)?;
        let verifier = parse_client_verifier(&files.paths[0], &files.pems[0], &files.provider)?;
        Ok(Self {
            label,
            allowed_names,
            current: Mutex::new(Current {
                value: verifier,
                files: Some(files),
            }),
        })
    }

    /// New handshakes are checked with `verifier`.
    pub fn replace(&self, verifier: Arc<dyn ClientCertVerifier>) {
        lock(&self.current).value = verifier;
    }

    /// The verifier for the bundle now, re-reading a followed file first if it changed.
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let label = self.label;
        let mut current = lock(&self.current);
        let Current { value, files } = &mut *current;
        if let Some(files) = files {
            files.refresh(value, |files, pems| {
                let ca_file = &files.paths[0];
                match parse_client_verifier(ca_file, &pems[0], &files.provider) {
                    Ok(verifier) => {
                        info!(ca = %ca_file.display(), "{label} client CA reloaded");
                        Some(verifier)
                    }
                    Err(error) => {
                        warn!(%error, "{label} client CA file changed but does not load; keeping the previous CA");
                        None
                    }
                }
            });
        }
        Arc::clone(value)
    }
}

impl ClientCertVerifier for ReloadingClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Cannot borrow from a bundle that may be swapped; the hints are optional, and a client with one
        // certificate (the API server's kubeconfig entry, an agent) sends it without them.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_names.is_empty() {
            return Ok(verified);
        }
        let names = certificate_names(end_entity);
        if names.iter().any(|n| self.allowed_names.contains(n)) {
            Ok(verified)
        } else {
            debug!(
                ?names,
                "{} client certificate names none of the allowed names", self.label
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// What is served now, and the files it follows (none: it changes only when replaced).
#[derive(Debug)]
struct Current<T: ?Sized> {
    value: Arc<T>,
    files: Option<Followed>,
}

fn lock<T: ?Sized>(current: &Mutex<Current<T>>) -> std::sync::MutexGuard<'_, Current<T>> {
    current.lock().unwrap_or_else(|p| p.into_inner())
}

/// Followed files and what they held when the served value was built from them.
#[derive(Debug)]
struct Followed {
    paths: Vec<PathBuf>,
    provider: Arc<CryptoProvider>,
    stamps: Vec<Option<Stamp>>,
    pems: Vec<Vec<u8>>,
    /// Contents that failed to load, so a bad version is reported once, not per handshake.
    failed: Option<Vec<Vec<u8>>>,
}

impl Followed {
    fn new(paths: Vec<PathBuf>, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        let pems = paths
            .iter()
            .map(|p| read(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            paths,
            provider,
            stamps,
            pems,
            failed: None,
        })
    }

    /// Rebuilds `value` with `build` when the files hold new contents; `build` logs and returns `None` for
    /// contents that do not load, which keep `value`.
    fn refresh<T: ?Sized>(
        &mut self,
        value: &mut Arc<T>,
        build: impl FnOnce(&Self, &[Vec<u8>]) -> Option<Arc<T>>,
    ) {
        let stamps: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        let now = SystemTime::now();
        let racy = stamps
            .iter()
            .any(|s| s.as_ref().is_none_or(|s| s.is_racy(now)));
        if stamps == self.stamps && !racy {
            return;
        }
        // A file missing or unreadable for a moment (mid-swap) keeps the current value.
        let Ok(pems) = self
            .paths
            .iter()
            .map(std::fs::read)
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        self.stamps = stamps;
        if pems == self.pems || self.failed.as_ref() == Some(&pems) {
            return;
        }
        match build(self, &pems) {
            Some(built) => {
                *value = built;
                self.pems = pems;
                self.failed = None;
            }
            None => self.failed = Some(pems),
        }
    }
}

/// How long after a write the metadata alone is not trusted to reveal another write.
const RACY: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn is_racy(&self, now: SystemTime) -> bool {
        match self.modified {
            None => true,
            // A time in the future (clock skew) is racy too.
            Some(modified) => now.duration_since(modified).map_or(true, |age| age < RACY),
        }
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn parse_certified_key(
    cert_file: &Path,
    key_file: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert_file, cert_pem)?;
    // The key's text never goes into an error message.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_file.to_owned(),
        message: format!("no usable private key ({e})"),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        TlsError::Invalid(format!(
            "{} and {} do not make a usable certificate and key: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })
}

fn parse_client_verifier(
    ca_file: &Path,
    pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_file, pem)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            path: ca_file.to_owned(),
            message: format!("not a usable CA certificate: {e}"),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| TlsError::Invalid(format!("client CA {}: {e}", ca_file.display())))
}

/// The subject CNs, DNS SANs and URI SANs of a certificate (empty when it does not parse).
fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) => names.push((*n).to_owned()),
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A self-signed certificate and key PEM for 127.0.0.1, each padded with trailing
    /// newlines (ignored by PEM parsing) to a fixed size.
    fn pair(pad_to: usize) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pad = |mut pem: String| {
            assert!(pem.len() <= pad_to);
            pem.extend(std::iter::repeat_n('\n', pad_to - pem.len()));
            pem.into_bytes()
        };
        (pad(cert.pem()), pad(key.serialize_pem()))
    }

    fn write_with_mtime(path: &Path, bytes: &[u8], mtime: SystemTime) {
        std::fs::write(path, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }

    #[test]
    fn a_same_size_rewrite_within_one_timestamp_tick_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let tick = SystemTime::now();
        let (cert_a, key_a) = pair(2048);
        write_with_mtime(&cert_file, &cert_a, tick);
        write_with_mtime(&key_file, &key_a, tick);
        let resolver =
            ReloadingCert::follow("test", cert_file.clone(), key_file.clone(), provider()).unwrap();
        let first = resolver.current().cert[0].clone();

        // Same size, same inode, same (coarse) modification time: only the bytes differ.
        let (cert_b, key_b) = pair(2048);
        write_with_mtime(&cert_file, &cert_b, tick);
        write_with_mtime(&key_file, &key_b, tick);
        let second = resolver.current().cert[0].clone();
        assert_ne!(first, second);
        assert_eq!(
            second.as_ref(),
            CertificateDer::from_pem_slice(&cert_b).unwrap().as_ref()
        );
    }

    #[test]
    fn keeps_serving_the_last_good_pair_when_the_new_one_does_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert_a, key_a) = pair(2048);
        std::fs::write(&cert_file, &cert_a).unwrap();
        std::fs::write(&key_file, &key_a).unwrap();
        let resolver =
            ReloadingCert::follow("test", cert_file.clone(), key_file.clone(), provider()).unwrap();
        let first = resolver.current().cert[0].clone();
        std::fs::write(&key_file, b"garbage").unwrap();
        assert_eq!(resolver.current().cert[0], first);
        std::fs::remove_file(&cert_file).unwrap();
        assert_eq!(resolver.current().cert[0], first);
    }

    #[test]
    fn a_replaced_certificate_is_served_and_files_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert_a, key_a) = pair(2048);
        std::fs::write(&cert_file, &cert_a).unwrap();
        std::fs::write(&key_file, &key_a).unwrap();
        let first = Arc::new(certified_key(&cert_file, &key_file, &provider()).unwrap());
        let resolver = ReloadingCert::new(Arc::clone(&first));
        let (cert_b, key_b) = pair(2048);
        std::fs::write(&cert_file, &cert_b).unwrap();
        std::fs::write(&key_file, &key_b).unwrap();
        assert_eq!(resolver.current().cert[0], first.cert[0]);
        let second = Arc::new(certified_key(&cert_file, &key_file, &provider()).unwrap());
        resolver.replace(Arc::clone(&second));
        assert_eq!(resolver.current().cert[0], second.cert[0]);
        assert_ne!(first.cert[0], second.cert[0]);
    }

    #[test]
    fn load_errors_name_the_file_and_never_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(2048);
        let (_, other_key) = pair(2048);
        for (name, bytes) in [
            ("tls.crt", &cert[..]),
            ("tls.key", &key[..]),
            ("other.key", &other_key[..]),
            ("garbage", b"hello"),
        ] {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let path = |name: &str| dir.path().join(name);
        let mismatch = certified_key(&path("tls.crt"), &path("other.key"), &provider())
            .unwrap_err()
            .to_string();
        assert!(mismatch.contains("do not make a usable"), "{mismatch}");
        assert!(!mismatch.contains("PRIVATE KEY"), "{mismatch}");
        let garbage = certified_key(&path("garbage"), &path("tls.key"), &provider())
            .unwrap_err()
            .to_string();
        assert!(garbage.contains("no CERTIFICATE"), "{garbage}");
        let missing = certified_key(&path("tls.crt"), &path("absent.key"), &provider())
            .unwrap_err()
            .to_string();
        assert!(missing.contains("absent.key"), "{missing}");
        let ca = client_verifier(&path("garbage"), &provider())
            .err()
            .unwrap()
            .to_string();
        assert!(
            ca.contains("garbage") && ca.contains("no CERTIFICATE"),
            "{ca}"
        );
    }
}
