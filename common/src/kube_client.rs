//! The one way both binaries build a Kubernetes client: `--kubeconfig` when given, else the in-cluster
//! service account, else (the agent only) the usual kubeconfig lookup.

use std::path::{Path, PathBuf};

/// Where to look when no `--kubeconfig` was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithoutKubeconfig {
    /// In-cluster, else `KUBECONFIG` / `~/.kube/config` (the agent: it cannot work without a cluster).
    InClusterThenLookup,
    /// In-cluster only (the writer: a developer's kubeconfig must not turn Leases on by accident).
    InClusterOnly,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("reading --kubeconfig {}: {source}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("loading --kubeconfig {}: {source}", path.display())]
    LoadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    /// Not in a cluster, and no kubeconfig was given or found.
    #[error("no Kubernetes API: not in a cluster and no kubeconfig found: {0}")]
    NoCluster(String),
    #[error("building the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// The client configuration: `kubeconfig` if given, else per `without`.
pub async fn config(
    kubeconfig: Option<&Path>,
    without: WithoutKubeconfig,
) -> Result<kube::Config, KubeClientError> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeClientError::ReadKubeconfig {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeClientError::LoadKubeconfig {
                    path: path.to_owned(),
                    source,
                })
        }
        None => match without {
            WithoutKubeconfig::InClusterThenLookup => kube::Config::infer()
                .await
                .map_err(|error| KubeClientError::NoCluster(error.to_string())),
            WithoutKubeconfig::InClusterOnly => kube::Config::incluster()
                .map_err(|error| KubeClientError::NoCluster(error.to_string())),
        },
    }
}

/// The client for `config`.
pub fn client(config: kube::Config) -> Result<kube::Client, KubeClientError> {
    kube::Client::try_from(config).map_err(KubeClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_kubeconfig_names_the_flag_and_the_path() {
        let error = config(
            Some(Path::new("/nonexistent/kubeconfig")),
            WithoutKubeconfig::InClusterOnly,
        )
        .await
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("reading --kubeconfig /nonexistent/kubeconfig"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn in_cluster_only_does_not_fall_back_to_a_kubeconfig_file() {
        // Outside a Pod there is no service account: the writer's mode must say so, not read KUBECONFIG.
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
             users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
             current-context: x\n",
        )
        .unwrap();
        let loaded = config(Some(&file), WithoutKubeconfig::InClusterOnly)
            .await
            .expect("an explicit kubeconfig loads");
        assert_eq!(loaded.cluster_url.to_string(), "https://127.0.0.1:1/");
        let error = config(None, WithoutKubeconfig::InClusterOnly)
            .await
            .unwrap_err();
        assert!(matches!(error, KubeClientError::NoCluster(_)), "{error}");
    }
}
