//! The git layer: one bare clone per (repository URL, branch), written to without a worktree.
//!
//! Data flow (all blocking; the writer runs it on dedicated threads):
//!
//! ```text
//! Clone::fetch ──► refs/remotes/origin/<branch> = remote tip = base
//!                                                     │
//! FileChange[] ──► Clone::commit(base, ..) ──► blobs + rewritten trees + commit ──► one pack (no ref moved)
//!                                                     │
//!                  Clone::push(commit) ──► refs/heads/<branch> on the remote, fast-forward only
//!                        │ Pushed   ──► base = commit
//!                        └ Rejected ──► caller fetches, rebuilds its changes on the new base, retries
//! ```
//!
//! Design points:
//! - The clone is bare: nothing half-written can be left in a worktree, and commits are built from
//!   trees directly, so the cost of a commit is proportional to the files it changes, not to the
//!   size of the repository. Trees are parsed once and cached (`tree.rs`); the objects of a
//!   commit are written as one pack of uncompressed entries, and small packs are merged
//!   (`pack.rs`).
//! - A remote in the local file system (`file://`, a plain path) is pushed to directly: the new
//!   objects as a pack, then a compare-and-swap of the branch under git's ref lock. Every other
//!   transport goes through libgit2's push, which walks every tree of the remote tip to decide
//!   what not to send: a cost proportional to the repository size (see `clone.rs`).
//! - Pushes never use a forced refspec. A non-fast-forward or stale rejection is an ordinary
//!   outcome ([`PushOutcome::Rejected`]), not an error: a human's concurrent commit must survive.
//! - Error messages never carry credentials: URLs are scrubbed of userinfo and secrets are masked.
//! - Server identity is always verified: SSH host keys only against the `known_hosts` content
//!   given in [`GitCredentials::Ssh`] (never `~/.ssh/known_hosts`, never "accept anything"); TLS
//!   against the system roots plus, optionally, [`RepoSpec::ca_cert_file`].

mod auth;
mod clone;
mod pack;
mod sign;
mod tree;
mod url;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use self::clone::Clone;
pub use self::sign::{CommitSigner, SigningError, SigningSource};

/// Deadlines of every network operation, in milliseconds (see [`set_process_options`]).
static CONNECT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(10_000);
static OPERATION_TIMEOUT_MS: AtomicU64 = AtomicU64::new(300_000);

/// Deadlines for talking to Git remotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkTimeouts {
    /// TCP connect (the reachability probe and libgit2's own connect).
    pub connect: Duration,
    /// One socket read or write without progress (libgit2's server timeout).
    pub io: Duration,
    /// A whole fetch or push, checked whenever libgit2 reports progress (the worker's watchdog enforces it
    /// also when none is reported).
    pub operation: Duration,
}

/// How much of the clones' pack files libgit2 may keep memory-mapped at once, in the whole process.
///
/// libgit2 reads packs through memory-mapped windows and unmaps them only above this total (8 GiB by default on
/// 64-bit). Those mapped pages count in the process's resident size (as file-backed memory the kernel can reclaim,
/// but a container's memory accounting and `VmHWM` see them): a push that reads every new object, or a large
/// clone, would otherwise grow the writer's RSS with the clone's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedPackLimit {
    /// The mapped total above which libgit2 unmaps the least recently used windows.
    pub total: usize,
}

impl MappedPackLimit {
    /// The size of one mapped window: a quarter of the total, 32 MiB at most (libgit2's default is 1 GiB, which
    /// would let one window of a large pack exceed any total).
    pub fn window(&self) -> usize {
        (self.total / 4).clamp(1 << 20, 32 << 20)
    }
}

/// Sets libgit2's process-wide options: the deadlines of every later fetch and push, and the mapped-pack limit.
/// libgit2's socket timeouts default to "none": a remote that accepts TCP and never answers would block a worker
/// (and the shutdown) forever. The first call wins (the settings are process-wide); call it at start-up, before any
/// libgit2 use.
#[allow(unsafe_code)]
pub fn set_process_options(
    timeouts: NetworkTimeouts,
    mapped_packs: MappedPackLimit,
) -> Result<(), GitError> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let millis = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1);
    let result = ONCE.get_or_init(|| {
        CONNECT_TIMEOUT_MS.store(timeouts.connect.as_millis() as u64, Ordering::Relaxed);
        OPERATION_TIMEOUT_MS.store(timeouts.operation.as_millis() as u64, Ordering::Relaxed);
        // SAFETY: these setters write libgit2's process-global options without synchronisation, which is
        // only unsound while another thread runs libgit2 concurrently. The OnceLock runs this body once per
        // process, and the writer calls it at start-up before any worker (the only libgit2 users) exists.
        unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(millis(timeouts.connect))
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(millis(timeouts.io)))
                .and_then(|()| git2::opts::set_mwindow_size(mapped_packs.window()))
                .and_then(|()| git2::opts::set_mwindow_mapped_limit(mapped_packs.total))
        }
        .map_err(|e| e.message().to_owned())
    });
    result.clone().map_err(GitError::Other)
}

/// The connect deadline set by [`set_process_options`] (10 s before).
pub(crate) fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// The whole-operation deadline set by [`set_process_options`] (300 s before).
pub(crate) fn operation_timeout() -> Duration {
    Duration::from_millis(OPERATION_TIMEOUT_MS.load(Ordering::Relaxed))
}
pub use self::url::{canonical_remote, redact_url};

/// How to authenticate against a remote.
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    /// HTTP basic auth.
    Basic { username: String, password: String },
    /// A token sent as the HTTP basic password; the username is the one in the URL, if any, else
    /// `x-access-token` (what GitHub, Gitea and GitLab accept).
    Token(String),
    /// An SSH private key. `known_hosts` is the content of a known_hosts file; it is the only
    /// source of trusted host keys.
    Ssh {
        /// Empty: the user the repository URL names (`ssh://alice@host/…`), else `git`.
        username: String,
        /// PEM or OpenSSH private key content.
        private_key: String,
        passphrase: Option<String>,
        /// known_hosts file content (`host[,host..] key-type base64-key`, `[host]:port` for
        /// non-default ports; hashed `|1|` entries are not supported).
        known_hosts: String,
    },
}

impl GitCredentials {
    /// The secret strings, so that they can be masked out of any error text.
    fn secrets(&self) -> Vec<&str> {
        match self {
            Self::Basic { password, .. } => vec![password],
            Self::Token(token) => vec![token],
            Self::Ssh {
                private_key,
                passphrase,
                ..
            } => std::iter::once(private_key.as_str())
                .chain(passphrase.as_deref())
                .collect(),
        }
    }
}

// Secrets must never reach logs: only non-secret fields are printed.
impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Self::Token(_) => f.debug_tuple("Token").field(&"<redacted>").finish(),
            Self::Ssh {
                username,
                passphrase,
                known_hosts,
                ..
            } => f
                .debug_struct("Ssh")
                .field("username", username)
                .field("private_key", &"<redacted>")
                .field("passphrase", &passphrase.as_ref().map(|_| "<redacted>"))
                .field("known_hosts_lines", &known_hosts.lines().count())
                .finish(),
        }
    }
}

/// Which remote branch a clone writes to, and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoSpec {
    /// `file://`, a plain path, `git://`, `https://`, `ssh://` or scp-like `user@host:path`.
    /// Credentials do not belong here (they are scrubbed from every message anyway).
    pub url: String,
    pub branch: String,
    pub credentials: Option<GitCredentials>,
    /// Extra trust anchors (PEM file) for HTTPS, on top of the system roots. A server certificate
    /// that the system roots reject is accepted only if it verifies, for the URL's host name,
    /// against a certificate in this file (include intermediates, the server's chain is not
    /// seen). Process-wide alternatives: the `SSL_CERT_FILE` / `SSL_CERT_DIR` environment
    /// variables read by OpenSSL at start-up.
    pub ca_cert_file: Option<PathBuf>,
    /// The key that signs every commit of the clone (none: unsigned commits).
    pub signing: SigningSource,
}

impl RepoSpec {
    /// A spec without credentials or extra CA.
    pub fn new(url: impl Into<String>, branch: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            branch: branch.into(),
            credentials: None,
            ca_cert_file: None,
            signing: SigningSource::default(),
        }
    }

    /// The same spec, signing its commits with what `signing` names at commit time.
    pub fn with_signing(mut self, signing: SigningSource) -> Self {
        self.signing = signing;
        self
    }

    /// The same spec with credentials.
    pub fn with_credentials(mut self, credentials: GitCredentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// The same spec with an extra CA file for HTTPS.
    pub fn with_ca_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert_file = Some(path.into());
        self
    }
}

impl fmt::Debug for RepoSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RepoSpec")
            .field("url", &redact_url(&self.url))
            .field("branch", &self.branch)
            .field("credentials", &self.credentials)
            .field("ca_cert_file", &self.ca_cert_file)
            .field("signing", &self.signing)
            .finish()
    }
}

/// One file to write or delete in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Repository-relative, `/`-separated; no empty, `.`, `..` or `.git` components.
    pub path: String,
    /// `None` deletes the file (a no-op when it does not exist).
    pub content: Option<Vec<u8>>,
}

impl FileChange {
    pub fn write(path: impl Into<String>, content: impl Into<Vec<u8>>) -> Self {
        Self {
            path: path.into(),
            content: Some(content.into()),
        }
    }

    pub fn delete(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            content: None,
        }
    }
}

/// Who made a commit and why. Both signatures are timestamped "now". The clone's [`RepoSpec::signing`] key, if
/// any, signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitMeta {
    pub author_name: String,
    pub author_email: String,
    pub committer_name: String,
    pub committer_email: String,
    /// The full message, trailers included.
    pub message: String,
}

/// What happened to a push that reached the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The remote branch now points at the pushed commit.
    Pushed,
    /// Non-fast-forward or stale: someone else pushed first. Fetch, rebuild on the new base, retry.
    Rejected,
}

/// Failures of the git layer. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The remote refused our credentials (or needed some we do not have).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The remote could not be reached (connection refused, DNS, timeout, broken transport).
    #[error("remote unreachable: {0}")]
    Unreachable(String),
    /// The server's identity could not be verified: SSH host key unknown or mismatched, or a TLS
    /// certificate not trusted.
    #[error("server identity not verified: {0}")]
    HostKey(String),
    /// The remote refused the update for a reason other than a lost race (a hook, a protected
    /// branch, permissions). Retrying will not help.
    #[error("push rejected by the remote: {0}")]
    Rejected(String),
    #[error("invalid branch name {0:?}")]
    InvalidBranch(String),
    #[error("invalid file path {0:?}")]
    InvalidPath(String),
    /// The changes cannot form a commit: git's tree rules refuse them (a path that would be a file and a
    /// folder at once). Deterministic: the same changes on the same parent fail the same way again.
    #[error("cannot build the commit: {0}")]
    Unbuildable(String),
    /// The commit could not be signed: nothing is committed (never an unsigned commit in its place).
    #[error("cannot sign the commit: {0}")]
    Signing(#[from] SigningError),
    #[error("git: {0}")]
    Other(String),
}

impl GitError {
    /// Whether building a commit failed because of the changes themselves (the same changes always fail), not
    /// because of the machine or the remote: only such failures are pinned on messages.
    pub fn is_caused_by_the_changes(&self) -> bool {
        matches!(self, GitError::Unbuildable(_) | GitError::InvalidPath(_))
    }
}

/// Stable worker id for a (repository, branch): hex SHA-256 of `"canonical repo_url|branch"` (see
/// [`canonical_remote`]), first 16 hex
/// characters. Used as the clone's directory name.
pub fn worker_id(repo_url: &str, branch: &str) -> String {
    let repo_url = url::canonical_remote(repo_url);
    let digest = Sha256::digest(format!("{repo_url}|{branch}").as_bytes());
    hex::encode(&digest[..8])
}

/// Checks a branch name with git's `check-ref-format` rules (see [`crate::names::validate_branch_name`]).
pub fn validate_branch_name(branch: &str) -> Result<(), GitError> {
    crate::names::validate_branch_name(branch).map_err(|invalid| GitError::InvalidBranch(invalid.0))
}

/// Checks a repository-relative file path: `/`-separated, no empty, `.`, `..` or `.git`
/// components (any case), no NUL or backslash.
pub fn validate_path(path: &str) -> Result<(), GitError> {
    let bad = path.is_empty()
        || path.contains(['\0', '\\'])
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.eq_ignore_ascii_case(".git"));
    if bad {
        return Err(GitError::InvalidPath(path.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_id_is_stable_and_distinguishes_branches() {
        let a = worker_id("https://example.com/r.git", "main");
        assert_eq!(a.len(), 16);
        assert_eq!(a, worker_id("https://example.com/r.git", "main"));
        assert_ne!(a, worker_id("https://example.com/r.git", "dev"));
    }

    #[test]
    fn branch_names_follow_check_ref_format() {
        for ok in ["main", "feature/x", "release-1.2", "a_b"] {
            assert!(validate_branch_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "/a", "a/", "a.lock", "a@{b",
            "-a", "a\\b",
        ] {
            assert!(
                matches!(validate_branch_name(bad), Err(GitError::InvalidBranch(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn paths_must_stay_inside_the_repository() {
        assert!(validate_path("ns/kind/name.yaml").is_ok());
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/./b",
            ".git/config",
            "a/.GIT/x",
            "a\\b",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let spec = RepoSpec::new("https://user:hunter2@example.com/r.git", "main")
            .with_credentials(GitCredentials::Basic {
                username: "u".into(),
                password: "s3cret".into(),
            });
        let text = format!("{spec:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
        let ssh = GitCredentials::Ssh {
            username: "git".into(),
            private_key: "-----BEGIN KEY-----".into(),
            passphrase: Some("pp".into()),
            known_hosts: "h ssh-ed25519 AAAA".into(),
        };
        let text = format!("{ssh:?} {:?}", GitCredentials::Token("tok".into()));
        assert!(!text.contains("BEGIN") && !text.contains("\"pp\"") && !text.contains("tok\""));
    }
}
