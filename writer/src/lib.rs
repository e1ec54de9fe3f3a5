//! `reverser-writer`: the half of gitops-reverser that owns Git.
//!
//! Data flow:
//! ```text
//! agent ──gRPC Writer.Sync──▶ session (validate, order) ──mpsc──▶ worker per (repo, branch)
//!                                                                   │ batch::Buffer (caps, snapshots)
//!                                                                   │ batch::plan (semantic no-ops, markers,
//!                                                                   │              one commit per author)
//!                                                                   ▼
//!                                          git::Clone (bare, blocking pool) ── push ff-only ──▶ remote
//!                                                                   │
//! agent ◀── Ack / Reject / DestinationStatus ◀──────────────────────┘ (acks only after the push)
//! ```
//! Pure logic lives in [`batch`], [`session`]'s validators and [`credentials`]; I/O actors in [`worker`]
//! (git on the blocking pool), [`lease`] (Kubernetes Leases), [`grpc`] (tonic) and the admin HTTP endpoint.
//! [`Args::run`] wires them together; `main.rs` only parses arguments.

pub mod batch;
pub mod credentials;
pub mod git;
pub mod grpc;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod session;
pub mod worker;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use reverser_common::{admin, telemetry};
use reverser_proto::v1::{writer_admin_server::WriterAdminServer, writer_server::WriterServer};

/// Command-line flags. Every flag can also be set through the environment variable named in `--help`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "reverser-writer",
    version,
    args_override_self = true,
    about = "gitops-reverser writer: commits and pushes what agents stream"
)]
pub struct Args {
    /// Address of the gRPC server (Writer, WriterAdmin, reflection, health).
    #[arg(long, env = "WRITER_GRPC_ADDR", default_value = "127.0.0.1:9443")]
    pub grpc_addr: SocketAddr,
    /// PEM certificate chain for TLS on the gRPC server.
    #[arg(long, env = "WRITER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "WRITER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    #[arg(long, env = "WRITER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (without TLS flags the writer otherwise refuses to).
    #[arg(long, env = "WRITER_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "WRITER_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    pub admin_addr: SocketAddr,
    /// Directory holding one bare clone per (repository, branch) worker.
    #[arg(
        long,
        env = "WRITER_WORK_DIR",
        default_value = "/var/cache/gitops-reverser"
    )]
    pub work_dir: PathBuf,
    /// YAML file mapping repository URL prefixes to credentials (see README "Git credentials").
    #[arg(long, env = "WRITER_GIT_CREDENTIALS")]
    pub git_credentials: Option<PathBuf>,
    /// Extra PEM CA bundle trusted for HTTPS remotes (self-hosted Git servers with a private CA).
    #[arg(long, env = "WRITER_GIT_CA_FILE")]
    pub git_ca_file: Option<PathBuf>,
    /// Flush when this many distinct files are buffered.
    #[arg(long, env = "WRITER_GIT_BATCH_MAX_FILES", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub git_batch_max_files: u64,
    /// Flush when this many MiB of content are buffered.
    #[arg(long, env = "WRITER_GIT_BATCH_MAX_BYTES_MIB", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub git_batch_max_bytes_mib: u64,
    /// Flush this many seconds after the first buffered change at the latest (fractions allowed).
    #[arg(long, env = "WRITER_GIT_BATCH_MAX_WAIT_SEC", default_value_t = 20.0)]
    pub git_batch_max_wait_sec: f64,
    /// Orphan files one snapshot may delete; 0 disables orphan deletion.
    #[arg(long, env = "WRITER_DELETES_CAP_PER_CYCLE", default_value_t = 500)]
    pub deletes_cap_per_cycle: usize,
    /// Committer (and bot author) name.
    #[arg(long, env = "WRITER_COMMIT_NAME", default_value = "GitOps Reverser")]
    pub commit_name: String,
    /// Committer (and bot author) e-mail.
    #[arg(
        long,
        env = "WRITER_COMMIT_EMAIL",
        default_value = "gitops-reverser@noreply.cluster.local"
    )]
    pub commit_email: String,
    /// Largest accepted object YAML, in bytes.
    #[arg(long, env = "WRITER_MAX_OBJECT_BYTES", default_value_t = 3 * 1024 * 1024)]
    pub max_object_bytes: usize,
    /// Maximum number of (repository, branch) workers.
    #[arg(long, env = "WRITER_WORKERS_MAX_GLOBAL", default_value_t = 24)]
    pub workers_max_global: usize,
    /// Maximum number of workers (branches) per repository.
    #[arg(long, env = "WRITER_WORKERS_MAX_PER_REPO", default_value_t = 5)]
    pub workers_max_per_repo: usize,
    /// Non-fast-forward rejections answered by fetch + replay within one flush before backing off.
    #[arg(long, env = "WRITER_PUSH_MAX_RETRIES", default_value_t = 5)]
    pub push_max_retries: u32,
    /// Leases: `auto` uses them when a Kubernetes API is reachable (in-cluster or --kubeconfig), `on` requires
    /// them, `off` disables them (the fast-forward-only push stays the fence).
    #[arg(long, env = "WRITER_LEASES", value_enum, default_value_t = LeaseMode::Auto)]
    pub leases: LeaseMode,
    /// Kubeconfig for Leases when not running in a cluster.
    #[arg(long, env = "WRITER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the Leases (default: the writer's own namespace in-cluster, else `default`).
    #[arg(long, env = "WRITER_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Lease holder identity (default: POD_NAME or the host name, plus a random suffix).
    #[arg(long, env = "WRITER_LEASE_IDENTITY")]
    pub lease_identity: Option<String>,
    /// Renew a held Lease every this many seconds.
    #[arg(long, env = "WRITER_LEASES_RENEW_SEC", default_value_t = 8)]
    pub leases_renew_sec: u64,
    /// Lease duration in seconds.
    #[arg(long, env = "WRITER_LEASES_LEASE_SEC", default_value_t = 24)]
    pub leases_lease_sec: u64,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "WRITER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "WRITER_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Plain)]
    pub log_format: telemetry::LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LeaseMode {
    Auto,
    On,
    Off,
}

/// A running writer (for tests and the binary).
pub struct RunningWriter {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWriter {
    /// Stops accepting streams, lets workers push what is pending, and waits.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.send_replace(true);
        self.server.await.context("writer task panicked")?
    }

    /// Waits until the server ends (on a shutdown signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await.context("writer task panicked")?
    }

    pub fn shutdown_handle(&self) -> tokio::sync::watch::Sender<bool> {
        self.shutdown.clone()
    }
}

impl Args {
    /// Parses flags, sets up logging and runs until SIGTERM/SIGINT.
    pub async fn parse_and_run() -> anyhow::Result<()> {
        let args = Args::parse();
        telemetry::init(&args.log_level, args.log_format)?;
        let running = args.start().await?;
        let shutdown = running.shutdown_handle();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown requested; pushing what is pending");
            shutdown.send_replace(true);
        });
        running.wait().await
    }

    fn worker_settings(&self) -> anyhow::Result<worker::WorkerSettings> {
        if !(self.git_batch_max_wait_sec.is_finite() && self.git_batch_max_wait_sec >= 0.0) {
            bail!("--git-batch-max-wait-sec must be a non-negative number");
        }
        Ok(worker::WorkerSettings {
            work_dir: self.work_dir.clone(),
            limits: batch::Limits {
                max_files: usize::try_from(self.git_batch_max_files).unwrap_or(usize::MAX),
                max_bytes: usize::try_from(
                    self.git_batch_max_bytes_mib.saturating_mul(1024 * 1024),
                )
                .unwrap_or(usize::MAX),
                max_wait: Duration::from_secs_f64(self.git_batch_max_wait_sec),
            },
            deletes_cap: self.deletes_cap_per_cycle,
            bot_name: self.commit_name.clone(),
            bot_email: self.commit_email.clone(),
            push_max_retries: self.push_max_retries,
            queue_capacity: 1024,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            refetch_after: Duration::from_secs(30),
            ca_cert_file: self.git_ca_file.clone(),
        })
    }

    async fn lease_settings(&self) -> anyhow::Result<Option<lease::LeaseSettings>> {
        if self.leases == LeaseMode::Off {
            info!(
                "leases are off (--leases=off): the fast-forward-only push is the only fence between writers"
            );
            return Ok(None);
        }
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .context("loading kubeconfig")?
            }
            None => match kube::Config::incluster() {
                Ok(config) => config,
                Err(error) => {
                    if self.leases == LeaseMode::On {
                        bail!(
                            "--leases=on but no Kubernetes API is reachable (not in a cluster, no --kubeconfig): {error}"
                        );
                    }
                    info!("leases are off: not running in a cluster and no --kubeconfig given");
                    return Ok(None);
                }
            },
        };
        let namespace = self
            .lease_namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
        let base = self
            .lease_identity
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "reverser-writer".into());
        let identity = format!("{base}-{:08x}", rand::random::<u32>());
        info!(%namespace, %identity, "leases are on");
        Ok(Some(lease::LeaseSettings {
            client,
            namespace,
            identity,
            lease_duration: Duration::from_secs(self.leases_lease_sec.max(1)),
            renew_every: Duration::from_secs(self.leases_renew_sec.max(1)),
        }))
    }

    /// Starts every component and returns once the listeners are bound.
    pub async fn start(self) -> anyhow::Result<RunningWriter> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let cert_pem = std::fs::read(cert)
                    .with_context(|| format!("reading --tls-cert {}", cert.display()))?;
                let key_pem = std::fs::read(key)
                    .with_context(|| format!("reading --tls-key {}", key.display()))?;
                let mut config =
                    ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
                if let Some(ca) = &self.tls_client_ca {
                    let ca_pem = std::fs::read(ca)
                        .with_context(|| format!("reading --tls-client-ca {}", ca.display()))?;
                    config = config
                        .client_ca_root(Certificate::from_pem(ca_pem))
                        .client_auth_optional(false);
                }
                Some(config)
            }
            _ => None,
        };
        if tls.is_none() && !self.grpc_addr.ip().is_loopback() && !self.allow_plaintext {
            bail!(
                "refusing to serve plaintext gRPC on {} (not a loopback address): give --tls-cert/--tls-key, or --allow-plaintext",
                self.grpc_addr
            );
        }
        std::fs::create_dir_all(&self.work_dir)
            .with_context(|| format!("creating --work-dir {}", self.work_dir.display()))?;
        // Two writers on one work dir would corrupt each other's clones: hold an exclusive lock for the process
        // lifetime (released by the OS even after kill -9).
        let work_dir_lock = std::fs::File::create(self.work_dir.join(".writer.lock"))
            .with_context(|| {
                format!(
                    "creating the lock file in --work-dir {}",
                    self.work_dir.display()
                )
            })?;
        if work_dir_lock.try_lock().is_err() {
            bail!(
                "another reverser-writer is using --work-dir {}",
                self.work_dir.display()
            );
        }
        let credentials = match &self.git_credentials {
            Some(path) => credentials::CredentialStore::load(path)?,
            None => credentials::CredentialStore::default(),
        };
        let metrics = metrics::Metrics::default();
        let registry = registry::Registry::new(
            self.worker_settings()?,
            registry::Caps {
                max_global: self.workers_max_global,
                max_per_repo: self.workers_max_per_repo,
            },
            credentials,
            self.lease_settings().await?,
            metrics.clone(),
        );

        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let readiness = admin::Readiness::default();
        let admin_shutdown = wait_for(shutdown_rx.clone());
        let (admin_addr, _admin) = admin::serve(
            self.admin_addr,
            metrics.registry.clone(),
            readiness.clone(),
            admin_shutdown,
        )
        .await
        .with_context(|| format!("binding --admin-addr {}", self.admin_addr))?;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(reverser_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(reverser_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<WriterServer<grpc::WriterService>>()
            .await;
        health
            .set_serving::<WriterAdminServer<grpc::AdminService>>()
            .await;

        let max_message = self.max_object_bytes.saturating_add(64 * 1024);
        let writer = WriterServer::new(grpc::WriterService {
            registry: registry.clone(),
            metrics: metrics.clone(),
            limits: session::SessionLimits {
                max_object_bytes: self.max_object_bytes,
            },
            shutdown: shutdown_rx.clone(),
        })
        .max_decoding_message_size(max_message);
        let admin_service = WriterAdminServer::new(grpc::AdminService {
            registry: registry.clone(),
        });

        let listener = tokio::net::TcpListener::bind(self.grpc_addr)
            .await
            .with_context(|| format!("binding --grpc-addr {}", self.grpc_addr))?;
        let grpc_addr = listener.local_addr()?;
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).context("configuring TLS")?;
        } else if !grpc_addr.ip().is_loopback() {
            warn!(%grpc_addr, "serving plaintext gRPC (--allow-plaintext)");
        }
        let router = builder
            .add_service(writer)
            .add_service(admin_service)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        info!(%grpc_addr, %admin_addr, work_dir = %self.work_dir.display(), "writer listening");
        readiness.set(true);
        let server_shutdown = wait_for(shutdown_rx);
        let server = tokio::spawn(async move {
            let _work_dir_lock = work_dir_lock;
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), server_shutdown)
                .await
                .context("gRPC server failed")?;
            readiness.set(false);
            // Streams are gone; let every worker push what it still holds, then stop.
            let workers = registry.shutdown();
            drop(registry);
            for worker in workers {
                if let Err(error) = worker.shutdown().await {
                    warn!(worker = %worker.id, %error, "final flush failed; the agents will re-send");
                }
            }
            info!("writer stopped");
            Ok(())
        });
        Ok(RunningWriter {
            grpc_addr,
            admin_addr,
            shutdown,
            server,
        })
    }
}

async fn wait_for(mut receiver: tokio::sync::watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
