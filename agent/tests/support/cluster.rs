//! One API server for the end-to-end tests, either backend:
//!
//! - `real` (the default, and what CI runs): etcd + kube-apiserver + kube-controller-manager v1.37.2
//!   ([`testkit::RealCluster`]), with RBAC, defaulting, managedFields, garbage collection and controllers;
//! - `emulator`: the project's in-process API-server double (`kube-emulator`), fast, for local runs.
//!
//! `REVERSER_E2E_BACKEND=emulator cargo nextest run …` picks the emulator. A test that needs one backend says why
//! and starts it with [`TestCluster::start_backend`].

#![allow(dead_code)]

use std::path::Path;

use kube_emulator::Emulator;
use testkit::RealCluster;

/// Which API server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Real,
    Emulator,
}

impl Backend {
    /// `$REVERSER_E2E_BACKEND` (`real` or `emulator`), `real` when unset.
    pub fn from_env() -> Backend {
        match std::env::var("REVERSER_E2E_BACKEND").as_deref() {
            Ok("emulator") => Backend::Emulator,
            Ok("real") | Err(_) => Backend::Real,
            Ok(other) => panic!("REVERSER_E2E_BACKEND must be `real` or `emulator`, not {other:?}"),
        }
    }
}

/// A running API server of either backend.
pub enum TestCluster {
    Real(Box<RealCluster>),
    Emulator(Emulator),
}

impl TestCluster {
    /// The backend `$REVERSER_E2E_BACKEND` names.
    pub async fn start() -> TestCluster {
        Self::start_backend(Backend::from_env()).await
    }

    pub async fn start_backend(backend: Backend) -> TestCluster {
        let _ = rustls::crypto::ring::default_provider().install_default();
        match backend {
            Backend::Real => TestCluster::Real(Box::new(
                RealCluster::builder()
                    .user("alice", &["developers"])
                    .user("bob", &["developers"])
                    .start()
                    .await,
            )),
            Backend::Emulator => TestCluster::Emulator(
                Emulator::start("127.0.0.1:0".parse().unwrap())
                    .await
                    .expect("emulator starts"),
            ),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestCluster::Real(_) => Backend::Real,
            TestCluster::Emulator(_) => Backend::Emulator,
        }
    }

    /// The emulator, for tests that use what only it has (fault injection); panics on the real backend.
    pub fn emulator(&self) -> &Emulator {
        match self {
            TestCluster::Emulator(emu) => emu,
            TestCluster::Real(_) => panic!("this step needs the emulator's fault injection"),
        }
    }

    /// Applies a multi-document YAML as the admin. On the real server this retries for a while on errors a real
    /// cluster makes right after a namespace appears (its `default` ServiceAccount is created asynchronously).
    pub async fn apply_yaml(&self, yaml: &str) {
        match self {
            TestCluster::Emulator(emu) => emu.apply_yaml(yaml).await.expect("objects apply"),
            TestCluster::Real(real) => {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
                loop {
                    let out = real.kubectl_with_stdin(
                        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
                        Some(yaml),
                    );
                    if out.status.success() {
                        break;
                    }
                    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                    let retryable = stderr.contains("serviceaccount")
                        || stderr.contains("ensure CRDs are installed first")
                        || stderr.contains("the server could not find the requested resource");
                    assert!(
                        retryable && tokio::time::Instant::now() < deadline,
                        "kubectl apply failed: {stderr}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Applies every `*.yaml` of a directory (CRDs are waited for until Established on the real server).
    pub async fn apply_dir(&self, dir: &Path) {
        match self {
            TestCluster::Emulator(emu) => emu.apply_dir(dir).await.expect("manifests apply"),
            TestCluster::Real(real) => real.apply_dir(dir),
        }
    }

    /// An admin client.
    pub async fn client(&self) -> kube::Client {
        match self {
            TestCluster::Emulator(emu) => emu.client().await,
            TestCluster::Real(_) => self.client_for(None).await,
        }
    }

    /// A client for `user` (`None`: the admin).
    pub async fn client_for(&self, user: Option<&str>) -> kube::Client {
        let yaml = self.kubeconfig_yaml(user);
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("client config");
        kube::Client::try_from(config).expect("client")
    }

    /// A kubeconfig for `user` (`None`: the admin). On the emulator the user gets a token on first use.
    pub fn kubeconfig_yaml(&self, user: Option<&str>) -> String {
        match (self, user) {
            (TestCluster::Emulator(emu), None) => emu.kubeconfig_yaml(None),
            (TestCluster::Emulator(emu), Some(name)) => {
                let token = format!("{name}-token");
                emu.add_token(&token, name, &["developers"]);
                emu.kubeconfig_yaml(Some(&token))
            }
            (TestCluster::Real(real), user) => real.kubeconfig_yaml(user),
        }
    }

    /// The real `kubectl` for the backend: the one built with the control plane on the real server, the
    /// system's on the emulator (as before).
    pub fn kubectl_binary(&self) -> std::path::PathBuf {
        match self {
            TestCluster::Real(_) => testkit::real_kube_binary("kubectl"),
            TestCluster::Emulator(_) => testkit::require_tool(
                "kubectl",
                "apt-get install -y kubernetes-client (scripts/install-test-deps.sh)",
            ),
        }
    }

    pub async fn shutdown(self) {
        match self {
            TestCluster::Emulator(emu) => emu.shutdown().await,
            TestCluster::Real(real) => {
                tokio::task::spawn_blocking(move || drop(real))
                    .await
                    .expect("real cluster stops");
            }
        }
    }
}
