//! The webhook's server certificate, re-read from its files when they change.
//!
//! Kubernetes rotates a mounted Secret by swapping a symlink (cert-manager renews every few
//! weeks); the API server only trusts the `caBundle`, so the leaf can change under a running
//! agent. Every TLS handshake checks the two files' metadata (modification time, size and
//! inode: a `stat` each) and re-reads them only when that changed — or while a file was
//! modified in the last two seconds, because a same-size rewrite within one timestamp tick
//! leaves the metadata unchanged (git's "racy" index entries have the same problem). New bytes
//! are loaded; a pair that does not load — half-written, or a new certificate with the old
//! key — keeps the previous certificate in service and is reported once.
//!
//! [`ReloadingClientCa`] does the same for `--webhook-client-ca`: the CA that signs the
//! certificate the API server presents (its admission configuration's `client-certificate`),
//! with an optional list of names the certificate must carry.

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

use super::WebhookError;

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

type Stamps = (Option<Stamp>, Option<Stamp>);
/// Certificate and key PEM bytes.
type Pems = (Vec<u8>, Vec<u8>);

#[derive(Debug)]
struct Current {
    stamps: Stamps,
    pems: Pems,
    key: Arc<CertifiedKey>,
    /// A pair that failed to load, so a bad pair is reported once, not per handshake.
    failed: Option<Pems>,
}

/// A [`ResolvesServerCert`] serving the PEM certificate chain and key in two files.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

impl ReloadingCert {
    /// Loads the pair now: a webhook that cannot serve its certificate must not start.
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, WebhookError> {
        let stamps = (stamp(&cert_file), stamp(&key_file));
        let pems = (read(&cert_file)?, read(&key_file)?);
        let key = Arc::new(parse_pair(&cert_file, &key_file, &pems, &provider)?);
        Ok(Self {
            cert_file,
            key_file,
            provider,
            current: Mutex::new(Current {
                stamps,
                pems,
                key,
                failed: None,
            }),
        })
    }

    /// The certificate to present now, reloading the files first if they changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (stamp(&self.cert_file), stamp(&self.key_file));
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        let racy = [&stamps.0, &stamps.1]
            .into_iter()
            .any(|s| s.as_ref().is_none_or(|s| s.is_racy(now)));
        if stamps == current.stamps && !racy {
            return Arc::clone(&current.key);
        }
        // A file missing or unreadable for a moment (mid-swap) keeps the current pair.
        let (Ok(cert_pem), Ok(key_pem)) = (read(&self.cert_file), read(&self.key_file)) else {
            return Arc::clone(&current.key);
        };
        current.stamps = stamps;
        let pems = (cert_pem, key_pem);
        if pems == current.pems || current.failed.as_ref() == Some(&pems) {
            return Arc::clone(&current.key);
        }
        match parse_pair(&self.cert_file, &self.key_file, &pems, &self.provider) {
            Ok(key) => {
                info!(cert = %self.cert_file.display(), "webhook certificate reloaded");
                current.key = Arc::new(key);
                current.pems = pems;
                current.failed = None;
            }
            Err(error) => {
                warn!(%error, "webhook certificate files changed but do not load; serving the previous certificate");
                current.failed = Some(pems);
            }
        }
        Arc::clone(&current.key)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The client-certificate check of the webhook: a chain to the CA bundle in `ca_file` (re-read
/// when the file changes, like the serving certificate), and, when `allowed_names` is not empty,
/// one of those names as the certificate's subject CN or a DNS or URI SAN. A bundle that stops
/// loading keeps the previous one in force.
#[derive(Debug)]
pub struct ReloadingClientCa {
    ca_file: PathBuf,
    allowed_names: Vec<String>,
    provider: Arc<CryptoProvider>,
    current: Mutex<CurrentCa>,
}

#[derive(Debug)]
struct CurrentCa {
    stamp: Option<Stamp>,
    pem: Vec<u8>,
    verifier: Arc<dyn ClientCertVerifier>,
    failed: Option<Vec<u8>>,
}

impl ReloadingClientCa {
    /// Loads the bundle now: a webhook told to authenticate its callers must not start without.
    pub fn load(
        ca_file: PathBuf,
        allowed_names: Vec<String>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, WebhookError> {
        let stamp = stamp(&ca_file);
        let pem = read(&ca_file)?;
        let verifier = client_verifier(&ca_file, &pem, &provider)?;
        Ok(Self {
            ca_file,
            allowed_names,
            provider,
            current: Mutex::new(CurrentCa {
                stamp,
                pem,
                verifier,
                failed: None,
            }),
        })
    }

    /// The verifier for the bundle in the file now.
    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let stamp = stamp(&self.ca_file);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let racy = stamp.as_ref().is_none_or(|s| s.is_racy(SystemTime::now()));
        if stamp == current.stamp && !racy {
            return Arc::clone(&current.verifier);
        }
        let Ok(pem) = read(&self.ca_file) else {
            return Arc::clone(&current.verifier);
        };
        current.stamp = stamp;
        if pem == current.pem || current.failed.as_ref() == Some(&pem) {
            return Arc::clone(&current.verifier);
        }
        match client_verifier(&self.ca_file, &pem, &self.provider) {
            Ok(verifier) => {
                info!(ca = %self.ca_file.display(), "webhook client CA reloaded");
                current.verifier = verifier;
                current.pem = pem;
                current.failed = None;
            }
            Err(error) => {
                warn!(%error, "webhook client CA file changed but does not load; keeping the previous CA");
                current.failed = Some(pem);
            }
        }
        Arc::clone(&current.verifier)
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
        // Cannot borrow from a bundle that may be swapped; the hints are optional, and a client
        // with one certificate (the API server's kubeconfig entry) sends it without them.
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
                "webhook client certificate names none of --webhook-client-names"
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

fn client_verifier(
    ca_file: &Path,
    pem: &[u8],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, WebhookError> {
    let bad = |message: String| WebhookError::Pem {
        path: ca_file.to_owned(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| bad(e.to_string()))
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

fn read(path: &Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|source| WebhookError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

fn parse_pair(
    cert_file: &Path,
    key_file: &Path,
    (cert_pem, key_pem): &Pems,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, WebhookError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Pem {
            path: cert_file.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(WebhookError::Pem {
            path: cert_file.to_owned(),
            message: "no certificate".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| WebhookError::Pem {
        path: key_file.to_owned(),
        message: e.to_string(),
    })?;
    // Also checks that the key belongs to the certificate: a rotation caught between the two
    // file writes must not be served.
    CertifiedKey::from_der(chain, key, provider).map_err(WebhookError::Tls)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ReloadingCert::load(cert_file.clone(), key_file.clone(), provider).unwrap();
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
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ReloadingCert::load(cert_file.clone(), key_file.clone(), provider).unwrap();
        let first = resolver.current().cert[0].clone();
        std::fs::write(&key_file, b"garbage").unwrap();
        assert_eq!(resolver.current().cert[0], first);
        std::fs::remove_file(&cert_file).unwrap();
        assert_eq!(resolver.current().cert[0], first);
    }
}
