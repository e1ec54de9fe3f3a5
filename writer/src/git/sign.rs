//! Commit signing: the `gpgsig` header `git commit -S` writes, over the commit object without that header.
//!
//! - SSH (`gpg.format=ssh`): an armored SSHSIG, namespace `git`, SHA-512; `git verify-commit` with an
//!   `gpg.ssh.allowedSignersFile` accepts it. Only ed25519 keys: what hosting services and `ssh-keygen -t ed25519`
//!   recommend, and signing with them cannot fail once the key has loaded.
//! - OpenPGP (`gpg.format=openpgp`, git's default): an armored detached binary signature (SHA-256) made with the
//!   primary key of an armored secret key (`gpg --export-secret-keys --armor`); `git verify-commit` accepts it
//!   with the public key in gpg's keyring.
//!
//! The key is checked when the configuration is loaded (format, type, passphrase), so a bad key stops the
//! configuration, never a commit. The private key stays inside [`CommitSigner`]: its `Debug` shows the public
//! fingerprint only, and no error text quotes the key.

use std::fmt;
use std::sync::Arc;

use pgp::composed::{
    ArmorOptions, Deserializable, DetachedSignature, SignedPublicKey, SignedSecretKey,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::types::{KeyDetails, Password};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

/// Git's namespace for SSH signatures of commits and tags (`ssh-keygen -Y sign -n git`).
const NAMESPACE: &str = "git";

/// Why a signing key cannot be used. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error(
        "not an OpenSSH private key ({0}); expected a file starting with -----BEGIN OPENSSH PRIVATE KEY----- \
         (ssh-keygen -t ed25519 writes one)"
    )]
    Malformed(String),
    #[error(
        "not an armored OpenPGP secret key ({0}); expected a file starting with -----BEGIN PGP PRIVATE KEY BLOCK----- \
         (gpg --export-secret-keys --armor KEYID writes one)"
    )]
    MalformedOpenPgp(String),
    #[error("the OpenPGP key cannot sign: {0}")]
    OpenPgpCannotSign(String),
    #[error("the key is {0}; only ed25519 keys can sign commits (ssh-keygen -t ed25519)")]
    WrongType(String),
    #[error("the key is encrypted: set its passphrase (passphraseFile)")]
    PassphraseMissing,
    #[error("cannot decrypt the key: wrong passphrase or unsupported cipher")]
    Decrypt,
    #[error("signing failed: {0}")]
    Sign(String),
}

/// A key that signs commits.
pub struct CommitSigner {
    key: Key,
    public_key: String,
    fingerprint: String,
}

enum Key {
    Ssh(Box<PrivateKey>),
    OpenPgp {
        key: Box<SignedSecretKey>,
        passphrase: Password,
    },
}

impl CommitSigner {
    /// Loads an OpenSSH private key (`-----BEGIN OPENSSH PRIVATE KEY-----`), decrypting it with `passphrase`
    /// when it is encrypted.
    pub fn from_ssh_private_key(
        text: &str,
        passphrase: Option<&str>,
    ) -> Result<Self, SigningError> {
        // The parser's messages name the failing field, never the bytes.
        let key = PrivateKey::from_openssh(text.trim()).map_err(|e| match e {
            // Key types this build does not decode (ECDSA, DSA, security keys) are not ed25519 either.
            ssh_key::Error::AlgorithmUnknown | ssh_key::Error::AlgorithmUnsupported { .. } => {
                SigningError::WrongType("not an ed25519 key".into())
            }
            e => SigningError::Malformed(e.to_string()),
        })?;
        let key = if key.is_encrypted() {
            let passphrase = passphrase
                .filter(|p| !p.is_empty())
                .ok_or(SigningError::PassphraseMissing)?;
            key.decrypt(passphrase).map_err(|_| SigningError::Decrypt)?
        } else {
            key
        };
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SigningError::WrongType(key.algorithm().to_string()));
        }
        let public = PublicKey::from(key.public_key().key_data().clone());
        let public_key = public
            .to_openssh()
            .map_err(|e| SigningError::Malformed(e.to_string()))?;
        let fingerprint = public.fingerprint(HashAlg::Sha256).to_string();
        Ok(Self {
            key: Key::Ssh(Box::new(key)),
            public_key,
            fingerprint,
        })
    }

    /// Loads an armored OpenPGP secret key (`-----BEGIN PGP PRIVATE KEY BLOCK-----`); its primary key signs,
    /// unlocked with `passphrase` when it is protected. A test signature is made now, so a key that cannot sign
    /// (wrong passphrase, a certification-only algorithm) is refused here and never at commit time.
    pub fn from_openpgp_secret_key(
        text: &str,
        passphrase: Option<&str>,
    ) -> Result<Self, SigningError> {
        let (key, _) = SignedSecretKey::from_string(text.trim())
            .map_err(|e| SigningError::MalformedOpenPgp(e.to_string()))?;
        let protected = key.primary_key.secret_params().is_encrypted();
        let passphrase = match passphrase.filter(|p| !p.is_empty()) {
            Some(p) => Password::from(p),
            None if protected => return Err(SigningError::PassphraseMissing),
            None => Password::empty(),
        };
        let public = SignedPublicKey::from(key.clone());
        let public_key = public
            .to_armored_string(ArmorOptions::default())
            .map_err(|e| SigningError::MalformedOpenPgp(e.to_string()))?;
        let fingerprint = format!("{:X}", key.primary_key.fingerprint());
        let signer = Self {
            key: Key::OpenPgp {
                key: Box::new(key),
                passphrase,
            },
            public_key,
            fingerprint,
        };
        signer.sign(b"").map_err(|e| match e {
            SigningError::Sign(_) if protected => SigningError::Decrypt,
            SigningError::Sign(why) => SigningError::OpenPgpCannotSign(why),
            e => e,
        })?;
        Ok(signer)
    }

    /// The public key: SSH in `authorized_keys` form (`ssh-ed25519 AAAA…`), for an allowed-signers file or a
    /// hosting service's "signing keys" page; OpenPGP as an armored public key block (`gpg --import` reads it).
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// SSH: `SHA256:…`, as `ssh-keygen -lf` prints it; OpenPGP: the primary key's fingerprint in upper-case hex, as
    /// `gpg --fingerprint` prints it (without spaces).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The armored signature of `payload` (the commit object without `gpgsig`), ending in a newline.
    pub fn sign(&self, payload: &[u8]) -> Result<String, SigningError> {
        let armored = match &self.key {
            Key::Ssh(key) => key
                .sign(NAMESPACE, HashAlg::Sha512, payload)
                .and_then(|sig| sig.to_pem(LineEnding::LF))
                .map_err(|e| SigningError::Sign(e.to_string()))?,
            Key::OpenPgp { key, passphrase } => DetachedSignature::sign_binary_data(
                rand_core_06::OsRng,
                &key.primary_key,
                passphrase,
                HashAlgorithm::Sha256,
                payload,
            )
            .and_then(|sig| sig.to_armored_string(ArmorOptions::default()))
            .map_err(|e| SigningError::Sign(e.to_string()))?,
        };
        let mut armored = armored.replace("\r\n", "\n");
        if !armored.ends_with('\n') {
            armored.push('\n');
        }
        Ok(armored)
    }
}

impl fmt::Debug for CommitSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitSigner")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Where a clone finds the key that signs its next commit. Asked at every commit, so a reloaded
/// configuration applies at once; `None` from it means unsigned commits.
#[derive(Clone, Default)]
pub struct SigningSource(Option<Arc<dyn Fn() -> Option<Arc<CommitSigner>> + Send + Sync>>);

impl SigningSource {
    /// Commits are signed with what `lookup` returns at the time.
    pub fn new(lookup: impl Fn() -> Option<Arc<CommitSigner>> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(lookup)))
    }

    /// Always the same key.
    pub fn fixed(signer: Arc<CommitSigner>) -> Self {
        Self::new(move || Some(signer.clone()))
    }

    /// The key for the next commit, if any.
    pub fn current(&self) -> Option<Arc<CommitSigner>> {
        self.0.as_ref().and_then(|lookup| lookup())
    }
}

impl PartialEq for SigningSource {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for SigningSource {}

impl fmt::Debug for SigningSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.current() {
            Some(signer) => write!(f, "SigningSource({})", signer.fingerprint()),
            None => f.write_str("SigningSource(unsigned)"),
        }
    }
}

/// `commit` (a commit object as git writes it) with a `gpgsig` header holding `signature` after the committer
/// line, continuation lines indented by one space, as `git commit -S` writes it.
pub(crate) fn with_signature_header(commit: &[u8], signature: &str) -> Vec<u8> {
    // The headers end at the first empty line; `committer` is the last header the writer emits.
    let headers_end = commit
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or(commit.len(), |i| i + 1);
    let mut out = Vec::with_capacity(commit.len() + signature.len() + 64);
    out.extend_from_slice(&commit[..headers_end]);
    out.extend_from_slice(b"gpgsig");
    for line in signature.trim_end_matches('\n').split('\n') {
        out.push(b' ');
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(&commit[headers_end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ed25519 key made by `ssh-keygen -t ed25519 -N '' -C test` (a test fixture, signs nothing real).
    const TEST_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACCHyHAmc3kdDpfWMNGqvBlYF+3pPwWzRpiU84JT+xPa5QAAAIiBcZMqgXGT
KgAAAAtzc2gtZWQyNTUxOQAAACCHyHAmc3kdDpfWMNGqvBlYF+3pPwWzRpiU84JT+xPa5Q
AAAEC1yWdSGsFMFlhhhhFoihivEWGmpq3GXUOxRSbIjN0z2IfIcCZzeR0Ol9Yw0aq8GVgX
7ek/BbNGmJTzglP7E9rlAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";

    #[test]
    fn the_header_goes_after_the_committer_with_indented_lines() {
        let commit = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor a <a@x> 1 +0000\ncommitter c <c@x> 1 +0000\n\nsubject\n\nbody\n\nmore\n";
        let signed = with_signature_header(commit, "-----BEGIN X-----\nabc\n-----END X-----\n");
        assert_eq!(
            String::from_utf8(signed).unwrap(),
            "tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor a <a@x> 1 +0000\ncommitter c <c@x> 1 +0000\ngpgsig -----BEGIN X-----\n abc\n -----END X-----\n\nsubject\n\nbody\n\nmore\n"
        );
    }

    #[test]
    fn loads_an_ed25519_key_and_never_prints_it() {
        let signer = CommitSigner::from_ssh_private_key(TEST_KEY, None).unwrap();
        assert!(signer.public_key().starts_with("ssh-ed25519 AAAA"));
        assert!(signer.fingerprint().starts_with("SHA256:"));
        let signer = Arc::new(signer);
        let shown = format!("{signer:?} {:?}", SigningSource::fixed(signer.clone()));
        assert!(
            !shown.contains("b3BlbnNz") && !shown.contains("PRIVATE"),
            "{shown}"
        );
        assert!(shown.contains(signer.fingerprint()), "{shown}");
        let armored = signer.sign(b"payload").unwrap();
        assert!(armored.starts_with("-----BEGIN SSH SIGNATURE-----\n"));
        assert!(armored.ends_with("-----END SSH SIGNATURE-----\n"));
    }

    #[test]
    fn bad_keys_say_what_is_wrong_without_quoting_them() {
        let garbage = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END OPENSSH PRIVATE KEY-----\n";
        let error = CommitSigner::from_ssh_private_key(garbage, None).unwrap_err();
        assert!(matches!(error, SigningError::Malformed(_)), "{error}");
        assert!(!error.to_string().contains("c2VjcmV0"), "{error}");
        let error = CommitSigner::from_ssh_private_key("not a key", None).unwrap_err();
        assert!(error.to_string().contains("OPENSSH PRIVATE KEY"), "{error}");
    }
}
