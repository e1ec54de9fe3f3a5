//! Who may write what: the clients of a standalone writer, each identified by its verified mTLS client
//! certificate, and the repositories, branches, base folders and cluster identities each may use.
//!
//! Pure logic: [`Policy`] is built by [`crate::config`] from the `--config` file and swapped on reload; the
//! session asks [`Access`] at every message. Without a configuration file the writer is the in-cluster writer of a
//! single agent and [`Access::Unrestricted`] allows everything, as before.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::watch;

/// Why something was refused (sent to the agent with reason `Forbidden`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// A repository URL or branch pattern: exact, or a prefix when it ends in `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(text.to_owned()),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == value,
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
        }
    }
}

/// Whether `folder` is `granted` or inside it (segment-wise: `clusters/prod` does not grant `clusters/prod2`).
pub fn folder_within(granted: &str, folder: &str) -> bool {
    let granted = granted.trim_end_matches('/');
    folder == granted
        || (folder.starts_with(granted) && folder.as_bytes().get(granted.len()) == Some(&b'/'))
}

/// One grant: any of `repos` × any of `branches` × inside any of `base_folders`.
#[derive(Clone, Debug)]
pub struct Grant {
    pub repos: Vec<Pattern>,
    pub branches: Vec<Pattern>,
    pub base_folders: Vec<String>,
}

impl Grant {
    fn allows(&self, repo_url: &str, branch: &str, base_folder: &str) -> bool {
        self.repos.iter().any(|p| p.matches(repo_url))
            && self.branches.iter().any(|p| p.matches(branch))
            && self
                .base_folders
                .iter()
                .any(|granted| folder_within(granted, base_folder))
    }
}

/// What one client certificate identity may do.
#[derive(Clone, Debug)]
pub struct ClientGrant {
    pub identity: String,
    /// Cluster UIDs it may claim in `Hello` (empty: any UID, as long as the name is allowed).
    pub cluster_uids: Vec<String>,
    /// Cluster names it may claim in `Hello` (empty: any name, as long as the UID is allowed).
    pub cluster_names: Vec<String>,
    pub grants: Vec<Grant>,
    /// Whether the agent may send its own Git credentials (used only for its own destinations).
    pub allow_agent_credentials: bool,
    /// Whether it may call `WriterAdmin` (which shows every client's destinations and can flush any worker).
    pub admin: bool,
}

impl ClientGrant {
    /// Checks the cluster a `Hello` claims.
    pub fn check_hello(&self, cluster_uid: &str, cluster_name: &str) -> Result<(), Denied> {
        let uid_ok =
            self.cluster_uids.is_empty() || self.cluster_uids.iter().any(|u| u == cluster_uid);
        let name_ok =
            self.cluster_names.is_empty() || self.cluster_names.iter().any(|n| n == cluster_name);
        // The configuration loader refuses clients with neither list, so "both empty" never allows anything.
        if uid_ok && name_ok && !(self.cluster_uids.is_empty() && self.cluster_names.is_empty()) {
            Ok(())
        } else {
            Err(Denied(format!(
                "client {:?} may not claim cluster uid {cluster_uid:?} name {cluster_name:?}",
                self.identity
            )))
        }
    }

    /// Checks a destination's repository, branch and base folder.
    pub fn check_destination(
        &self,
        repo_url: &str,
        branch: &str,
        base_folder: &str,
    ) -> Result<(), Denied> {
        if self
            .grants
            .iter()
            .any(|g| g.allows(repo_url, branch, base_folder))
        {
            Ok(())
        } else {
            Err(Denied(format!(
                "client {:?} has no grant for {} branch {branch:?} base folder {base_folder:?}",
                self.identity,
                crate::names::redact_url(repo_url)
            )))
        }
    }
}

/// Abuse limits of a standalone writer (from the configuration file's `limits:`).
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Largest gRPC message accepted (tonic's max decoding message size).
    pub max_message_bytes: Option<usize>,
    /// Concurrent `Writer.Sync` streams per client identity.
    pub max_streams_per_client: usize,
    /// Sustained messages per second per client identity (0: unlimited).
    pub messages_per_second: f64,
    /// Messages a client may send at once above the sustained rate.
    pub message_burst: f64,
    /// Sustained bytes per second per client identity (0: unlimited): large objects cost more than small ones.
    pub bytes_per_second: f64,
    /// Bytes a client may send at once above the sustained rate (a larger message waits for a full bucket).
    pub byte_burst: f64,
    /// A stream must say `Hello` within this time.
    pub hello_timeout: Duration,
    /// A stream that sends nothing for this long is ended (None: never; HTTP/2 keepalive still finds dead peers).
    pub idle_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: None,
            max_streams_per_client: 4,
            messages_per_second: 1000.0,
            message_burst: 5000.0,
            bytes_per_second: 16.0 * 1024.0 * 1024.0,
            byte_burst: 64.0 * 1024.0 * 1024.0,
            hello_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }
}

/// Every client of a configuration, by identity.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub clients: HashMap<String, Arc<ClientGrant>>,
    pub limits: Limits,
}

impl Policy {
    pub fn client(&self, identity: &str) -> Option<Arc<ClientGrant>> {
        self.clients.get(identity).cloned()
    }
}

/// What one stream may do.
#[derive(Clone, Debug)]
pub enum Access {
    /// No configuration file: the single in-cluster agent may do anything.
    Unrestricted,
    /// A configured client; the grant is looked up in the current policy at every check, so reloads apply at once.
    Client {
        identity: String,
        policy: watch::Receiver<Arc<Policy>>,
    },
}

impl Access {
    /// The client identity (None when unrestricted).
    pub fn identity(&self) -> Option<&str> {
        match self {
            Access::Unrestricted => None,
            Access::Client { identity, .. } => Some(identity),
        }
    }

    /// The client's current grant: `Ok(None)` when unrestricted, an error when the identity is no longer
    /// configured (revoked).
    pub fn grant(&self) -> Result<Option<Arc<ClientGrant>>, Denied> {
        match self {
            Access::Unrestricted => Ok(None),
            Access::Client { identity, policy } => {
                policy.borrow().client(identity).map(Some).ok_or_else(|| {
                    Denied(format!(
                        "client {identity:?} is not (or no longer) in the writer's configuration"
                    ))
                })
            }
        }
    }
}

/// The per-identity message budget: a client that sends faster than its rate is slowed down (its next message is
/// read later), never the others; one bucket is shared by every stream of an identity.
pub use reverser_common::rate::TokenBucket;

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientGrant {
        ClientGrant {
            identity: "spiffe://acme/cluster/prod".into(),
            cluster_uids: vec![],
            cluster_names: vec!["prod".into()],
            grants: vec![Grant {
                repos: vec![
                    Pattern::parse("https://git.example.com/acme/state.git"),
                    Pattern::parse("https://git.example.com/prod-*"),
                ],
                branches: vec![Pattern::parse("main"), Pattern::parse("env/*")],
                base_folders: vec!["clusters/prod".into()],
            }],
            allow_agent_credentials: false,
            admin: false,
        }
    }

    #[test]
    fn base_folders_are_granted_segment_wise() {
        assert!(folder_within("clusters/prod", "clusters/prod"));
        assert!(folder_within("clusters/prod", "clusters/prod/apps"));
        assert!(folder_within("clusters/prod/", "clusters/prod/apps"));
        assert!(!folder_within("clusters/prod", "clusters/prod2"));
        assert!(!folder_within("clusters/prod", "clusters"));
        assert!(!folder_within("clusters/prod", "clusters/staging"));
    }

    #[test]
    fn destinations_need_repo_branch_and_folder_of_one_grant() {
        let c = client();
        let repo = "https://git.example.com/acme/state.git";
        assert!(c.check_destination(repo, "main", "clusters/prod").is_ok());
        assert!(
            c.check_destination(repo, "env/dev", "clusters/prod/a")
                .is_ok()
        );
        assert!(
            c.check_destination(
                "https://git.example.com/prod-x.git",
                "main",
                "clusters/prod"
            )
            .is_ok()
        );
        let denied = c
            .check_destination(repo, "main", "clusters/staging")
            .unwrap_err();
        assert!(denied.0.contains("clusters/staging"), "{denied}");
        assert!(c.check_destination(repo, "dev", "clusters/prod").is_err());
        assert!(
            c.check_destination(
                "https://git.example.com/acme/state.git.evil",
                "main",
                "clusters/prod"
            )
            .is_err()
        );
        assert!(
            c.check_destination("https://git.example.com/other.git", "main", "clusters/prod")
                .is_err()
        );
    }

    #[test]
    fn hello_must_claim_an_allowed_cluster() {
        let mut c = client();
        assert!(c.check_hello("any-uid", "prod").is_ok());
        assert!(c.check_hello("any-uid", "staging").is_err());
        c.cluster_uids = vec!["uid-prod".into()];
        assert!(c.check_hello("uid-prod", "prod").is_ok());
        assert!(
            c.check_hello("uid-staging", "prod").is_err(),
            "both must match"
        );
        c.cluster_names.clear();
        assert!(c.check_hello("uid-prod", "whatever").is_ok());
        c.cluster_uids.clear();
        assert!(
            c.check_hello("uid-prod", "prod").is_err(),
            "nothing listed: nothing allowed"
        );
    }

    #[test]
    fn revoked_identities_are_denied_and_unrestricted_access_has_no_grant() {
        let mut policy = Policy::default();
        policy.clients.insert("a".into(), Arc::new(client()));
        let (tx, rx) = watch::channel(Arc::new(policy));
        let access = Access::Client {
            identity: "a".into(),
            policy: rx,
        };
        assert!(access.grant().unwrap().is_some());
        tx.send_replace(Arc::new(Policy::default()));
        assert!(access.grant().is_err());
        assert!(Access::Unrestricted.grant().unwrap().is_none());
    }
}
