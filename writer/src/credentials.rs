//! The writer's own Git credentials (`--git-credentials FILE`): URL prefixes mapped to HTTP basic/token or SSH
//! key credentials. They win over credentials an agent sends, and `Destination.credentials.reference` names an
//! entry. Secret values may sit in the file or, better, in files it points to (mounted Secrets).
//!
//! ```yaml
//! credentials:
//!   - name: github                       # optional; lets agents reference it
//!     urlPrefix: https://github.com/acme/
//!     username: x-access-token
//!     passwordFile: /etc/reverser/git/token
//!   - urlPrefix: ssh://git@git.example.com/
//!     sshPrivateKeyFile: /etc/reverser/git/id_ed25519
//!     knownHostsFile: /etc/reverser/git/known_hosts
//! ```
//!
//! The writer configuration file (`--config`, see [`crate::config`]) takes the same entries under its own
//! `credentials:` key; there, relative file paths are resolved against the configuration file's folder.
//!
//! Both files may also list commit signing keys, chosen per repository by the longest matching URL prefix:
//!
//! ```yaml
//! commitSigning:
//!   - urlPrefix: https://github.com/acme/  # or one repository's whole URL
//!     format: ssh                          # an ed25519 OpenSSH key (the default format)
//!     keyFile: /etc/reverser/signing/id_ed25519
//!     passphraseFile: /etc/reverser/signing/passphrase   # only for an encrypted key
//!   - urlPrefix: https://github.com/acme/prod.git
//!     format: openpgp                      # an armored secret key (gpg --export-secret-keys --armor)
//!     keyFile: /etc/reverser/signing/prod.asc
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::git::{CommitSigner, GitCredentials};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("credentials entry {index} ({prefix}): {message}")]
    Invalid {
        index: usize,
        prefix: String,
        message: String,
    },
    #[error("commitSigning entry {index} ({prefix}): {message}")]
    InvalidSigning {
        index: usize,
        prefix: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileFormat {
    #[serde(default)]
    credentials: Vec<RawEntry>,
    #[serde(default)]
    commit_signing: Vec<RawSigningEntry>,
}

/// One commit signing entry as written in YAML (shared by `--git-credentials` and the `--config` file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSigningEntry {
    url_prefix: String,
    #[serde(default = "ssh_format")]
    format: String,
    key_file: PathBuf,
    passphrase_file: Option<PathBuf>,
}

fn ssh_format() -> String {
    "ssh".into()
}

/// The key that signs the commits of the repositories under `url_prefix`.
#[derive(Clone, Debug)]
struct SigningEntry {
    url_prefix: String,
    signer: Arc<CommitSigner>,
}

/// One credentials entry as written in YAML (shared by `--git-credentials` and the `--config` file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawEntry {
    name: Option<String>,
    url_prefix: String,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ssh_private_key_file: Option<PathBuf>,
    ssh_passphrase_file: Option<PathBuf>,
    known_hosts_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Entry {
    name: Option<String>,
    url_prefix: String,
    credentials: GitCredentials,
}

/// Loaded credentials configuration. Secret values are held in memory only and never printed (the
/// `GitCredentials` Debug implementation redacts them).
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    entries: Vec<Entry>,
    signing: Vec<SigningEntry>,
    /// The files the secrets were read from (token, password, key, known_hosts): the writer reloads when one
    /// changes, so a rotated token applies without a restart.
    source_files: Vec<PathBuf>,
}

fn read_secret(path: &Path) -> Result<String, std::io::Error> {
    Ok(std::fs::read_to_string(path)?
        .trim_end_matches(['\n', '\r'])
        .to_owned())
}

/// Whether `prefix` covers `url` at a boundary: `https://git.example.com` covers `https://git.example.com/acme/x`
/// but not `https://git.example.com.evil.net/x`, and `https://github.com/acme` not `https://github.com/acme-evil/x`
/// (a token must never reach another host or owner).
pub fn prefix_fits(prefix: &str, url: &str) -> bool {
    url.strip_prefix(prefix).is_some_and(|rest| {
        rest.is_empty() || prefix.ends_with(['/', ':']) || rest.starts_with(['/', ':'])
    })
}

impl CredentialStore {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.into(),
            source,
        })?;
        let parsed: FileFormat =
            serde_saphyr::from_str(&text).map_err(|e| CredentialsError::Parse {
                path: path.into(),
                message: reverser_common::yaml::error_without_values(&e),
            })?;
        Self::from_entries(parsed.credentials, None)?.with_signing(parsed.commit_signing, None)
    }

    /// Builds a store from parsed entries; relative file paths are resolved against `base_dir` when given.
    pub fn from_entries(
        raw_entries: Vec<RawEntry>,
        base_dir: Option<&Path>,
    ) -> Result<Self, CredentialsError> {
        let mut entries = Vec::with_capacity(raw_entries.len());
        let mut source_files = Vec::new();
        for (index, raw) in raw_entries.into_iter().enumerate() {
            let prefix = crate::git::redact_url(&raw.url_prefix);
            let invalid = |message: String| CredentialsError::Invalid {
                index,
                prefix: prefix.clone(),
                message,
            };
            let sources = std::cell::RefCell::new(Vec::new());
            let read = |p: &PathBuf| {
                let p = match base_dir {
                    Some(base) if p.is_relative() => base.join(p),
                    _ => p.clone(),
                };
                let secret =
                    read_secret(&p).map_err(|e| invalid(format!("reading {}: {e}", p.display())));
                sources.borrow_mut().push(p);
                secret
            };
            let password = match (&raw.password, &raw.password_file) {
                (Some(p), None) => Some(p.clone()),
                (None, Some(f)) => Some(read(f)?),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(invalid("set password or passwordFile, not both".into()));
                }
            };
            let token = match (&raw.token, &raw.token_file) {
                (Some(t), None) => Some(t.clone()),
                (None, Some(f)) => Some(read(f)?),
                (None, None) => None,
                (Some(_), Some(_)) => {
                    return Err(invalid("set token or tokenFile, not both".into()));
                }
            };
            let credentials = match (password, token, &raw.ssh_private_key_file) {
                (Some(password), None, None) => GitCredentials::Basic {
                    username: raw
                        .username
                        .clone()
                        .ok_or_else(|| invalid("password needs a username".into()))?,
                    password,
                },
                (None, Some(token), None) => match &raw.username {
                    Some(username) => GitCredentials::Basic {
                        username: username.clone(),
                        password: token,
                    },
                    None => GitCredentials::Token(token),
                },
                (None, None, Some(key_file)) => {
                    let known_hosts_file = raw.known_hosts_file.as_ref().ok_or_else(|| {
                        invalid(
                            "SSH keys need knownHostsFile (unknown hosts are never accepted)"
                                .into(),
                        )
                    })?;
                    GitCredentials::Ssh {
                        // Empty: the user the repository URL names, else `git` (git/auth.rs).
                        username: raw.username.clone().unwrap_or_default(),
                        private_key: read(key_file)?,
                        passphrase: raw.ssh_passphrase_file.as_ref().map(read).transpose()?,
                        known_hosts: read(known_hosts_file)?,
                    }
                }
                (None, None, None) => {
                    return Err(invalid("no password, token or sshPrivateKeyFile".into()));
                }
                _ => {
                    return Err(invalid(
                        "set exactly one of password(File), token(File), sshPrivateKeyFile".into(),
                    ));
                }
            };
            entries.push(Entry {
                name: raw.name,
                url_prefix: raw.url_prefix,
                credentials,
            });
            source_files.extend(sources.into_inner());
        }
        Ok(Self {
            entries,
            signing: Vec::new(),
            source_files,
        })
    }

    /// Adds commit signing keys; every key is loaded and checked now (format, type, passphrase), so a bad one
    /// stops the configuration instead of a commit. Relative paths are resolved against `base_dir` when given.
    pub fn with_signing(
        mut self,
        raw_entries: Vec<RawSigningEntry>,
        base_dir: Option<&Path>,
    ) -> Result<Self, CredentialsError> {
        for (index, raw) in raw_entries.into_iter().enumerate() {
            let invalid = |message: String| CredentialsError::InvalidSigning {
                index,
                prefix: crate::git::redact_url(&raw.url_prefix),
                message,
            };
            if raw.url_prefix.trim().is_empty() {
                return Err(invalid("urlPrefix is required".into()));
            }
            if self.signing.iter().any(|e| e.url_prefix == raw.url_prefix) {
                return Err(invalid("another entry has the same urlPrefix".into()));
            }
            let openpgp = match raw.format.as_str() {
                "ssh" => false,
                "openpgp" => true,
                "x509" => {
                    return Err(invalid(
                        "format \"x509\" is not supported: use ssh (an ed25519 key) or openpgp"
                            .into(),
                    ));
                }
                other => {
                    return Err(invalid(format!(
                        "unknown format {other:?}; use ssh or openpgp"
                    )));
                }
            };
            let resolve = |p: &PathBuf| match base_dir {
                Some(base) if p.is_relative() => base.join(p),
                _ => p.clone(),
            };
            let key_file = resolve(&raw.key_file);
            let key = read_secret(&key_file)
                .map_err(|e| invalid(format!("reading {}: {e}", key_file.display())))?;
            let passphrase_file = raw.passphrase_file.as_ref().map(resolve);
            let passphrase = passphrase_file
                .as_ref()
                .map(|p| {
                    read_secret(p).map_err(|e| invalid(format!("reading {}: {e}", p.display())))
                })
                .transpose()?;
            let signer = if openpgp {
                CommitSigner::from_openpgp_secret_key(&key, passphrase.as_deref())
            } else {
                CommitSigner::from_ssh_private_key(&key, passphrase.as_deref())
            }
            .map_err(|e| invalid(format!("{}: {e}", key_file.display())))?;
            self.source_files.push(key_file);
            self.source_files.extend(passphrase_file);
            self.signing.push(SigningEntry {
                url_prefix: raw.url_prefix,
                signer: Arc::new(signer),
            });
        }
        Ok(self)
    }

    /// The key that signs commits to `url`: the signing entry with the longest matching prefix.
    pub fn signing_for(&self, url: &str) -> Option<Arc<CommitSigner>> {
        self.signing
            .iter()
            .filter(|e| prefix_fits(&e.url_prefix, url))
            .max_by_key(|e| e.url_prefix.len())
            .map(|e| e.signer.clone())
    }

    /// The files the secrets were read from.
    pub fn source_files(&self) -> &[PathBuf] {
        &self.source_files
    }

    /// Credentials for `url`: the entry with the longest matching prefix.
    pub fn for_url(&self, url: &str) -> Option<&GitCredentials> {
        self.entries
            .iter()
            .filter(|e| prefix_fits(&e.url_prefix, url))
            .max_by_key(|e| e.url_prefix.len())
            .map(|e| &e.credentials)
    }

    /// This store's entries followed by `other`'s (for `for_url`, the longest prefix still wins).
    pub fn merged(mut self, other: CredentialStore) -> CredentialStore {
        self.entries.extend(other.entries);
        self.signing.extend(other.signing);
        self.source_files.extend(other.source_files);
        self
    }

    /// The URL prefix of the entry named `name`, if any (to check that a reference fits a repository).
    pub fn prefix_of(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.name.as_deref() == Some(name))
            .map(|e| e.url_prefix.as_str())
    }

    /// Credentials an agent referenced by name.
    pub fn by_name(&self, name: &str) -> Option<&GitCredentials> {
        self.entries
            .iter()
            .find(|e| e.name.as_deref() == Some(name))
            .map(|e| &e.credentials)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_prefix_covers_urls_only_at_a_boundary() {
        assert!(prefix_fits(
            "https://git.example.com",
            "https://git.example.com/acme/x.git"
        ));
        assert!(prefix_fits(
            "https://git.example.com/",
            "https://git.example.com/acme/x.git"
        ));
        assert!(prefix_fits("git@github.com", "git@github.com:acme/x.git"));
        assert!(prefix_fits(
            "https://github.com/acme/x.git",
            "https://github.com/acme/x.git"
        ));
        assert!(!prefix_fits(
            "https://git.example.com",
            "https://git.example.com.evil.net/x.git"
        ));
        assert!(!prefix_fits(
            "https://github.com/acme",
            "https://github.com/acme-evil/x.git"
        ));
        assert!(!prefix_fits(
            "https://github.com/acme/",
            "https://github.com/other/x.git"
        ));
    }

    #[test]
    fn longest_prefix_wins_and_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "token", "s3cret-token\n");
        write(dir.path(), "key", "KEY");
        write(dir.path(), "kh", "[127.0.0.1]:22 ssh-ed25519 AAAA");
        let config = write(
            dir.path(),
            "creds.yaml",
            &format!(
                "credentials:\n  - urlPrefix: https://git.example.com/\n    username: bot\n    password: pw\n  - name: acme\n    urlPrefix: https://git.example.com/acme/\n    tokenFile: {0}/token\n  - urlPrefix: ssh://git@host/\n    sshPrivateKeyFile: {0}/key\n    knownHostsFile: {0}/kh\n",
                dir.path().display()
            ),
        );
        let store = CredentialStore::load(&config).unwrap();
        assert!(
            matches!(store.for_url("https://git.example.com/acme/repo.git"), Some(GitCredentials::Token(t)) if t == "s3cret-token")
        );
        assert!(
            matches!(store.for_url("https://git.example.com/other.git"), Some(GitCredentials::Basic { username, .. }) if username == "bot")
        );
        assert!(
            matches!(store.for_url("ssh://git@host/x.git"), Some(GitCredentials::Ssh { username, .. }) if username.is_empty()),
            "no username configured: the URL's user is used at connect time"
        );
        assert!(store.for_url("https://elsewhere/x.git").is_none());
        assert!(store.by_name("acme").is_some());
        assert!(
            !format!("{store:?}").contains("s3cret-token"),
            "debug output must redact secrets"
        );
    }

    #[test]
    fn rejects_ssh_without_known_hosts_and_ambiguous_entries() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "key", "KEY");
        let config = write(
            dir.path(),
            "a.yaml",
            &format!(
                "credentials:\n  - urlPrefix: ssh://h/\n    sshPrivateKeyFile: {}/key\n",
                dir.path().display()
            ),
        );
        let error = CredentialStore::load(&config).unwrap_err().to_string();
        assert!(error.contains("knownHostsFile"), "{error}");
        let config = write(
            dir.path(),
            "b.yaml",
            "credentials:\n  - urlPrefix: https://h/\n    token: t\n    password: p\n    username: u\n",
        );
        assert!(CredentialStore::load(&config).is_err());
        let config = write(
            dir.path(),
            "c.yaml",
            "credentials:\n  - urlPrefix: https://h/\n    bogus: 1\n",
        );
        assert!(
            CredentialStore::load(&config)
                .unwrap_err()
                .to_string()
                .contains("bogus")
        );
    }
}
