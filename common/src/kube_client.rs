//! The one way both binaries build a Kubernetes client: `--kubeconfig` when given, else the in-cluster
//! service account, else (the agent only) the usual kubeconfig lookup.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Longest silence on an API server connection before its request fails. kube sets none, so a LIST whose server
/// vanished without closing the connection (a partition drops packets, nothing is refused) would wait for ever and
/// hold its list permit. Watches are unaffected: the server ends each after 290 s (kube's watcher asks for that and
/// gives up 5 s later itself).
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(295);

/// The client configuration: `kubeconfig` if given, else per `without`; reads time out after
/// [`API_READ_TIMEOUT`] unless the configuration sets its own.
pub async fn config(
    kubeconfig: Option<&Path>,
    without: WithoutKubeconfig,
) -> Result<kube::Config, KubeClientError> {
    let mut config = located_config(kubeconfig, without).await?;
    config.read_timeout.get_or_insert(API_READ_TIMEOUT);
    Ok(config)
}

async fn located_config(
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
        assert_eq!(loaded.read_timeout, Some(API_READ_TIMEOUT));
        let error = config(None, WithoutKubeconfig::InClusterOnly)
            .await
            .unwrap_err();
        assert!(matches!(error, KubeClientError::NoCluster(_)), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_request_after_the_read_timeout() {
        // A listener that accepts and stays silent: what a partitioned API server looks like to the client.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = std::thread::spawn(move || {
            let connections: Vec<_> = listener.incoming().take(4).collect();
            std::thread::sleep(Duration::from_secs(60));
            drop(connections);
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{addr}'}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
            ),
        )
        .unwrap();
        let mut loaded = config(Some(&file), WithoutKubeconfig::InClusterOnly)
            .await
            .unwrap();
        assert_eq!(loaded.read_timeout, Some(API_READ_TIMEOUT));
        // The same mechanism with a test-sized timeout; without one the request would wait for the listener.
        loaded.read_timeout = Some(Duration::from_secs(1));
        let client = client(loaded).unwrap();
        let request = http::Request::get("/api/v1/namespaces")
            .body(Vec::new())
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), client.request_text(request))
            .await
            .expect("the read timeout ends the request, not the test's own limit");
        assert!(outcome.is_err(), "{outcome:?}");
    }
}
