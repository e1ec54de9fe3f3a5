//! Remote callbacks for one network operation: credentials (tried once, never in a loop), SSH host
//! key verification against the configured known_hosts content only, and the optional extra CA
//! for HTTPS. What went wrong is recorded in [`CallState`] so that the caller can turn libgit2's
//! generic error into the right [`GitError`](super::GitError) variant.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::sync::Arc;

use git2::cert::CertHostkey;
use git2::{CertificateCheckStatus, Cred, CredentialType, RemoteCallbacks};

use super::url::endpoint;
use super::{GitCredentials, RepoSpec};

/// What the callbacks observed during one fetch or push.
#[derive(Default)]
pub(crate) struct CallState {
    /// Set when we refused to hand out credentials (again); the text says why.
    pub auth_failure: RefCell<Option<String>>,
    /// Set when we rejected the SSH server's host key; the text says why.
    pub identity_failure: RefCell<Option<String>>,
    /// Why the extra CA did not vouch for a TLS certificate (libgit2 may still trust it).
    pub tls_note: RefCell<Option<String>>,
    /// When the whole operation must be over (see `--git-operation-timeout-sec`).
    deadline: Cell<Option<std::time::Instant>>,
    /// Set when a progress callback aborted the operation at its deadline.
    pub timed_out: Cell<bool>,
    userpass_tries: Cell<u32>,
    key_tries: Cell<u32>,
    username_tries: Cell<u32>,
}

impl CallState {
    /// False (abort) once the operation's deadline has passed.
    fn within_deadline(&self) -> bool {
        let late = self
            .deadline
            .get()
            .is_some_and(|d| std::time::Instant::now() >= d);
        if late {
            self.timed_out.set(true);
        }
        !late
    }

    fn fail_auth(&self, why: &str) -> git2::Error {
        *self.auth_failure.borrow_mut() = Some(why.to_owned());
        git2::Error::from_str(why)
    }

    fn fail_identity(&self, why: String) -> git2::Error {
        let err = git2::Error::from_str(&why);
        *self.identity_failure.borrow_mut() = Some(why);
        err
    }
}

/// Callbacks for `spec`, reporting into `state`.
pub(crate) fn callbacks<'a>(spec: &'a RepoSpec, state: &'a CallState) -> RemoteCallbacks<'a> {
    let mut cb = RemoteCallbacks::new();
    // libgit2's socket timeout bounds a silent remote; this bounds one that trickles data forever.
    state
        .deadline
        .set(Some(std::time::Instant::now() + super::operation_timeout()));
    cb.transfer_progress(move |_| state.within_deadline());
    cb.sideband_progress(move |_| state.within_deadline());
    cb.push_negotiation(move |_| {
        if state.within_deadline() {
            Ok(())
        } else {
            Err(git2::Error::from_str(
                "the push took longer than its deadline",
            ))
        }
    });
    cb.credentials(move |_url, user_from_url, allowed| {
        credentials(spec.credentials.as_ref(), state, user_from_url, allowed)
    });
    cb.certificate_check(move |cert, host| {
        if let Some(hostkey) = cert.as_hostkey() {
            let port = endpoint(&spec.url).map_or(22, |e| e.port);
            let known_hosts = match &spec.credentials {
                Some(GitCredentials::Ssh { known_hosts, .. }) => known_hosts.as_str(),
                _ => "",
            };
            return match check_host_key(known_hosts, host, port, hostkey) {
                Ok(()) => Ok(CertificateCheckStatus::CertificateOk),
                Err(why) => Err(state.fail_identity(why)),
            };
        }
        if let (Some(x509), Some(ca_file)) = (cert.as_x509(), spec.ca_cert_file.as_deref()) {
            return match verify_with_extra_ca(ca_file, x509.data(), host) {
                Ok(()) => Ok(CertificateCheckStatus::CertificateOk),
                Err(why) => {
                    // Passthrough: libgit2 keeps its own verdict (system roots); remember our
                    // reason in case that verdict is "untrusted" too.
                    *state.tls_note.borrow_mut() = Some(why);
                    Ok(CertificateCheckStatus::CertificatePassthrough)
                }
            };
        }
        Ok(CertificateCheckStatus::CertificatePassthrough)
    });
    cb
}

// libgit2 calls this again after every rejected attempt; answering twice for the same kind of
// credential would loop forever on a wrong password, so the second request is a failure.
fn credentials(
    creds: Option<&GitCredentials>,
    state: &CallState,
    user_from_url: Option<&str>,
    allowed: CredentialType,
) -> Result<Cred, git2::Error> {
    let once = |counter: &Cell<u32>, what: &str| {
        counter.set(counter.get() + 1);
        if counter.get() > 1 {
            Err(state.fail_auth(&format!("the remote rejected the configured {what}")))
        } else {
            Ok(())
        }
    };
    match creds {
        None => Err(state.fail_auth("the remote requires credentials and none are configured")),
        Some(GitCredentials::Basic { username, password })
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
        {
            once(&state.userpass_tries, "username/password")?;
            Cred::userpass_plaintext(username, password)
        }
        Some(GitCredentials::Token(token))
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) =>
        {
            once(&state.userpass_tries, "token")?;
            Cred::userpass_plaintext(user_from_url.unwrap_or("x-access-token"), token)
        }
        Some(GitCredentials::Ssh {
            username,
            private_key,
            passphrase,
            ..
        }) => {
            let user = match (username.as_str(), user_from_url) {
                ("", from_url) => from_url.unwrap_or("git"),
                // libgit2 logs in as the URL's user: a different key user would fail as the cryptic "username
                // does not match previous request".
                (configured, Some(from_url)) if configured != from_url => {
                    return Err(state.fail_auth(&format!(
                        "the SSH credentials name the user {configured:?} but the repository URL names {from_url:?}: \
                         make them agree, or leave the credentials' username empty to use the URL's"
                    )));
                }
                (configured, _) => configured,
            };
            if allowed.contains(CredentialType::USERNAME) {
                once(&state.username_tries, "SSH user name")?;
                Cred::username(user)
            } else if allowed.contains(CredentialType::SSH_KEY) {
                once(&state.key_tries, "SSH key")?;
                Cred::ssh_key_from_memory(user, None, private_key, passphrase.as_deref())
                    .map_err(|_| state.fail_auth("the configured SSH private key cannot be loaded"))
            } else {
                Err(state.fail_auth("the remote offers no SSH public-key authentication"))
            }
        }
        Some(_) => Err(state.fail_auth(
            "the configured credentials do not fit the authentication the remote asks for",
        )),
    }
}

/// Accepts the host key only if a known_hosts line for `host` (port 22) or `[host]:port` carries
/// exactly this key. Anything else, including an empty known_hosts, is a rejection.
fn check_host_key(
    known_hosts: &str,
    host: &str,
    port: u16,
    key: &CertHostkey<'_>,
) -> Result<(), String> {
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let Some(raw) = key.hostkey() else {
        return Err(format!("the SSH server {name} sent no host key"));
    };
    let offered_type = key.hostkey_type().map_or("unknown", |t| t.name());
    let offered = base64_encode(raw);
    let mut host_listed = false;
    for line in known_hosts.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let revoked = first == "@revoked";
        if first.starts_with('@') {
            if !revoked {
                continue; // @cert-authority: host certificates are not supported
            }
            first = fields.next().unwrap_or_default();
        }
        let (Some(key_type), Some(key_b64)) = (fields.next(), fields.next()) else {
            continue;
        };
        let host_matches = first.split(',').any(|pattern| {
            pattern.eq_ignore_ascii_case(&name)
                || (port == 22 && pattern.eq_ignore_ascii_case(&format!("[{host}]:22")))
        });
        if !host_matches {
            continue;
        }
        let same_key = key_b64 == offered && key_type == offered_type;
        if revoked && same_key {
            return Err(format!("the host key of {name} is marked @revoked"));
        }
        if !revoked {
            host_listed = true;
            if same_key {
                return Ok(());
            }
        }
    }
    Err(if host_listed {
        format!("the {offered_type} host key of {name} does not match known_hosts")
    } else {
        format!("{name} is not in known_hosts")
    })
}

/// Verifies a server certificate (DER, leaf only: libgit2 shows no chain) for `host` against the
/// certificates in `ca_file`, with rustls' WebPKI verifier.
fn verify_with_extra_ca(ca_file: &Path, der: &[u8], host: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let shown = ca_file.display();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read CA file {shown}: {e}"))?
    {
        let cert = cert.map_err(|e| format!("bad certificate in {shown}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {shown}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("cannot use CA file {shown}: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("host {host}: {e}"))?;
    verifier
        .verify_server_cert(&CertificateDer::from(der), &[], &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| format!("certificate of {host} not trusted by {shown}: {e}"))
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn missing_credentials_fail_instead_of_looping() {
        let state = CallState::default();
        let allowed = CredentialType::USER_PASS_PLAINTEXT;
        assert!(credentials(None, &state, None, allowed).is_err());
        assert!(state.auth_failure.borrow().is_some());
    }

    #[test]
    fn a_password_is_offered_once_then_refused() {
        let state = CallState::default();
        let creds = GitCredentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        let allowed = CredentialType::USER_PASS_PLAINTEXT;
        assert!(credentials(Some(&creds), &state, None, allowed).is_ok());
        assert!(credentials(Some(&creds), &state, None, allowed).is_err());
        assert!(state.auth_failure.borrow().is_some());
    }
}
