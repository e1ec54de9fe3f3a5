//! The writer configuration file (`--config FILE`) of a standalone writer serving several clusters: listener and
//! TLS files, abuse limits, Git credentials (the `--git-credentials` entry format) and the clients, each identified
//! by its verified client certificate and granted repositories, branches, base folders and cluster identities.
//! With a configuration file anything not granted is denied. `writer/config.example.yaml` documents every key.
//!
//! Relative paths are resolved against the configuration file's folder. The file is re-read when it (or a TLS
//! file) changes; a bad new version is logged and the previous one stays in force (see [`crate::tls`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    authz::{ClientGrant, Grant, Limits, Pattern, Policy},
    credentials::{CredentialStore, RawEntry, RawSigningEntry},
    tls::TlsPaths,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    listen: Option<RawListen>,
    tls: Option<RawTls>,
    reload_interval_sec: Option<f64>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    credentials: Vec<RawEntry>,
    #[serde(default)]
    commit_signing: Vec<RawSigningEntry>,
    #[serde(default)]
    clients: Vec<RawClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListen {
    grpc_addr: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(rename = "clientCA")]
    client_ca: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLimits {
    max_message_bytes: Option<usize>,
    max_streams_per_client: Option<usize>,
    messages_per_second: Option<f64>,
    message_burst: Option<f64>,
    bytes_per_second: Option<f64>,
    byte_burst: Option<f64>,
    hello_timeout_sec: Option<f64>,
    idle_timeout_sec: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClient {
    identity: String,
    #[serde(default, rename = "clusterUIDs")]
    cluster_uids: Vec<String>,
    #[serde(default)]
    cluster_names: Vec<String>,
    #[serde(default)]
    grants: Vec<RawGrant>,
    #[serde(default)]
    allow_agent_credentials: bool,
    #[serde(default)]
    admin: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawGrant {
    repos: Vec<String>,
    branches: Vec<String>,
    base_folders: Vec<String>,
}

/// A loaded, validated configuration.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub path: PathBuf,
    pub grpc_addr: Option<SocketAddr>,
    pub tls: Option<TlsPaths>,
    pub reload_interval: Duration,
    pub credentials: CredentialStore,
    pub policy: Policy,
}

fn seconds(field: &str, value: Option<f64>, default: Duration) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v)),
        Some(v) => Err(format!(
            "{field} must be a positive number of seconds, got {v}"
        )),
    }
}

impl WriterConfig {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as the content of `path` (relative paths are resolved against its folder).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: reverser_common::yaml::error_without_values(&e),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let resolve = |p: PathBuf| if p.is_relative() { base_dir.join(p) } else { p };
        let tls = raw.tls.map(|t| TlsPaths {
            cert: resolve(t.cert),
            key: resolve(t.key),
            client_ca: Some(resolve(t.client_ca)),
        });
        let reload_interval = seconds(
            "reloadIntervalSec",
            raw.reload_interval_sec,
            Duration::from_secs(5),
        )
        .map_err(invalid)?;
        let defaults = Limits::default();
        let l = raw.limits;
        if l.max_message_bytes == Some(0) || l.max_streams_per_client == Some(0) {
            return Err(invalid(
                "limits.maxMessageBytes and limits.maxStreamsPerClient must be at least 1".into(),
            ));
        }
        for (field, value) in [
            ("limits.messagesPerSecond", l.messages_per_second),
            ("limits.messageBurst", l.message_burst),
            ("limits.bytesPerSecond", l.bytes_per_second),
            ("limits.byteBurst", l.byte_burst),
        ] {
            if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(invalid(format!(
                    "{field} must be a number >= 0 (0: unlimited)"
                )));
            }
        }
        let limits = Limits {
            max_message_bytes: l.max_message_bytes,
            max_streams_per_client: l
                .max_streams_per_client
                .unwrap_or(defaults.max_streams_per_client),
            messages_per_second: l
                .messages_per_second
                .unwrap_or(defaults.messages_per_second),
            message_burst: l.message_burst.unwrap_or(defaults.message_burst),
            bytes_per_second: l.bytes_per_second.unwrap_or(defaults.bytes_per_second),
            byte_burst: l.byte_burst.unwrap_or(defaults.byte_burst),
            hello_timeout: seconds(
                "limits.helloTimeoutSec",
                l.hello_timeout_sec,
                defaults.hello_timeout,
            )
            .map_err(invalid)?,
            idle_timeout: l
                .idle_timeout_sec
                .map(|v| seconds("limits.idleTimeoutSec", Some(v), Duration::ZERO))
                .transpose()
                .map_err(invalid)?,
        };
        let credentials = CredentialStore::from_entries(raw.credentials, Some(&base_dir))
            .map_err(|e| invalid(format!("credentials: {e}")))?
            .with_signing(raw.commit_signing, Some(&base_dir))
            .map_err(|e| invalid(e.to_string()))?;

        let mut clients = HashMap::new();
        for (index, client) in raw.clients.into_iter().enumerate() {
            let identity = client.identity.trim().to_owned();
            let at = |message: String| invalid(format!("clients[{index}] ({identity}): {message}"));
            if identity.is_empty() {
                return Err(invalid(format!("clients[{index}]: identity is required")));
            }
            // An admin-only client (a person with grpcurl) needs neither: its Hello is refused, WriterAdmin works.
            let admin_only = client.admin && client.grants.is_empty();
            if client.cluster_uids.is_empty() && client.cluster_names.is_empty() && !admin_only {
                return Err(at(
                    "list the clusterNames and/or clusterUIDs this client may claim in Hello"
                        .into(),
                ));
            }
            if client.grants.is_empty() && !client.admin {
                return Err(at(
                    "grants is empty: the client could write nowhere (admin-only clients set admin: true)"
                        .into(),
                ));
            }
            let mut grants = Vec::with_capacity(client.grants.len());
            for (g, grant) in client.grants.into_iter().enumerate() {
                if grant.repos.is_empty()
                    || grant.branches.is_empty()
                    || grant.base_folders.is_empty()
                {
                    return Err(at(format!(
                        "grants[{g}] needs at least one of each: repos, branches, baseFolders"
                    )));
                }
                if grant
                    .repos
                    .iter()
                    .chain(&grant.branches)
                    .any(|p| p.trim().is_empty())
                {
                    return Err(at(format!("grants[{g}]: empty repo or branch pattern")));
                }
                let mut base_folders = Vec::with_capacity(grant.base_folders.len());
                for folder in grant.base_folders {
                    let folder = folder.trim_end_matches('/').to_owned();
                    reverser_common::paths::validate_base_folder(&folder)
                        .map_err(|e| at(format!("grants[{g}].baseFolders {folder:?}: {e}")))?;
                    base_folders.push(folder);
                }
                grants.push(Grant {
                    repos: grant.repos.iter().map(|p| Pattern::parse(p)).collect(),
                    branches: grant.branches.iter().map(|p| Pattern::parse(p)).collect(),
                    base_folders,
                });
            }
            let grant = ClientGrant {
                identity: identity.clone(),
                cluster_uids: client.cluster_uids,
                cluster_names: client.cluster_names,
                grants,
                allow_agent_credentials: client.allow_agent_credentials,
                admin: client.admin,
            };
            if clients.insert(identity.clone(), Arc::new(grant)).is_some() {
                return Err(invalid(format!(
                    "clients: identity {identity:?} is listed twice"
                )));
            }
        }
        Ok(WriterConfig {
            path: path.into(),
            grpc_addr: raw.listen.and_then(|l| l.grpc_addr),
            tls,
            reload_interval,
            credentials,
            policy: Policy { clients, limits },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
tls: {cert: tls.crt, key: tls.key, clientCA: /etc/ca.crt}
listen: {grpcAddr: "0.0.0.0:9443"}
reloadIntervalSec: 2
limits: {maxStreamsPerClient: 2, messagesPerSecond: 50, messageBurst: 100, idleTimeoutSec: 600}
credentials:
  - urlPrefix: https://git.example.com/
    token: t0ken
clients:
  - identity: spiffe://acme/cluster/prod
    clusterNames: [prod]
    grants:
      - repos: ["https://git.example.com/acme/*"]
        branches: [main]
        baseFolders: [clusters/prod/]
  - identity: agent.staging.example.com
    clusterUIDs: [uid-staging]
    allowAgentCredentials: true
    admin: true
    grants:
      - {repos: [file:///srv/state.git], branches: ["*"], baseFolders: [clusters/staging]}
"#;

    #[test]
    fn parses_a_full_configuration() {
        let config = WriterConfig::parse(Path::new("/etc/reverser/writer.yaml"), GOOD).unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/etc/reverser/tls.crt"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/ca.crt")));
        assert_eq!(config.grpc_addr, Some("0.0.0.0:9443".parse().unwrap()));
        assert_eq!(config.reload_interval, Duration::from_secs(2));
        let limits = &config.policy.limits;
        assert_eq!(limits.max_streams_per_client, 2);
        assert_eq!(limits.idle_timeout, Some(Duration::from_secs(600)));
        assert!(
            config
                .credentials
                .for_url("https://git.example.com/x.git")
                .is_some()
        );
        let prod = config.policy.client("spiffe://acme/cluster/prod").unwrap();
        assert!(
            prod.check_destination(
                "https://git.example.com/acme/s.git",
                "main",
                "clusters/prod/x"
            )
            .is_ok()
        );
        assert!(!prod.allow_agent_credentials && !prod.admin);
        let staging = config.policy.client("agent.staging.example.com").unwrap();
        assert!(staging.check_hello("uid-staging", "anything").is_ok());
        assert!(staging.admin && staging.allow_agent_credentials);
        assert!(config.policy.client("someone-else").is_none());
    }

    fn error_of(text: &str) -> String {
        WriterConfig::parse(Path::new("w.yaml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        assert!(error_of("clients: [{identity: a, bogus: 1}]").contains("bogus"));
        let no_clusters = error_of(
            "clients: [{identity: a, grants: [{repos: [x], branches: [main], baseFolders: [c]}]}]",
        );
        assert!(no_clusters.contains("clusterNames"), "{no_clusters}");
        assert!(
            error_of("clients: [{identity: a, clusterNames: [p]}]").contains("grants is empty")
        );
        // A person with grpcurl: WriterAdmin only, no cluster, no grant.
        assert!(
            WriterConfig::parse(
                Path::new("w.yaml"),
                "clients: [{identity: ops, admin: true}]"
            )
            .is_ok()
        );
        let escape = error_of(
            "clients: [{identity: a, clusterNames: [p], grants: [{repos: [x], branches: [m], baseFolders: ['../up']}]}]",
        );
        assert!(escape.contains("baseFolders"), "{escape}");
        let twice = error_of(
            "clients:\n  - {identity: a, clusterNames: [p], grants: [{repos: [x], branches: [m], baseFolders: [c]}]}\n  - {identity: a, clusterNames: [q], grants: [{repos: [x], branches: [m], baseFolders: [d]}]}\n",
        );
        assert!(twice.contains("twice"), "{twice}");
        assert!(error_of("limits: {maxStreamsPerClient: 0}").contains("maxStreamsPerClient"));
        assert!(error_of("reloadIntervalSec: -1").contains("reloadIntervalSec"));
        assert!(
            error_of("tls: {cert: a}").contains("key")
                || error_of("tls: {cert: a}").contains("missing")
        );
        assert!(error_of("credentials: [{urlPrefix: x}]").contains("credentials"));
        assert!(
            error_of("clients: [{identity: ' ', clusterNames: [p], grants: []}]")
                .contains("identity")
        );
    }

    #[test]
    fn the_committed_example_is_valid() {
        let path = testkit::manifest_dir().join("config.example.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        // The example's secret files live under /etc/reverser; point them at a temp dir that has them.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("git")).unwrap();
        for name in ["git/token", "git/id_ed25519", "git/known_hosts"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        // The signing key is loaded (and checked) with the configuration: it must be a real one.
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.path().join("git/signing_ed25519"))
            .status()
            .expect("ssh-keygen (OpenSSH) makes the example's signing key");
        assert!(status.success());
        let text = text.replace("/etc/reverser/", &format!("{}/", dir.path().display()));
        let config = WriterConfig::parse(&path, &text).unwrap();
        assert_eq!(config.policy.clients.len(), 3);
        assert!(config.tls.is_some());
        assert_eq!(
            config.policy.limits.bytes_per_second,
            16.0 * 1024.0 * 1024.0
        );
        assert_eq!(config.policy.limits.byte_burst, 64.0 * 1024.0 * 1024.0);
        assert!(
            config
                .credentials
                .signing_for("https://github.com/acme/cluster-state.git")
                .is_some()
        );
    }

    #[test]
    fn commit_signing_entries_are_checked_with_the_configuration() {
        let x509 = error_of(
            "commitSigning: [{urlPrefix: 'https://h/', format: x509, keyFile: /nonexistent}]",
        );
        assert!(
            x509.contains("commitSigning entry 0") && x509.contains("not supported"),
            "{x509}"
        );
        let unknown =
            error_of("commitSigning: [{urlPrefix: 'https://h/', format: pgp2, keyFile: k}]");
        assert!(unknown.contains("unknown format"), "{unknown}");
        let missing = error_of("commitSigning: [{urlPrefix: 'https://h/', keyFile: /nonexistent}]");
        assert!(missing.contains("reading /nonexistent"), "{missing}");
        assert!(error_of("commitSigning: [{urlPrefix: 'https://h/'}]").contains("keyFile"));
    }
}
