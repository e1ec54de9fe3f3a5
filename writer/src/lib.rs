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
//! Protocol types stop at [`grpc`]: [`grpc::convert`] checks each agent message into a domain
//! [`session::Inbound`] and turns the domain [`reply::Reply`] values of the session and the workers into protocol
//! replies, which travel on a bounded channel per stream ([`reply`]).
//!
//! Pure logic lives in [`batch`], [`grpc::convert`]'s validators, [`session::authorize`], [`names`],
//! [`credentials`], [`config`] and [`authz`]; I/O actors in [`worker`] (git on the blocking pool), [`lease`]
//! (Kubernetes Leases), [`grpc`] (tonic), [`tls`] (rustls with certificate reload) and the admin HTTP endpoint.
//! [`Args::start`] wires them together; `main.rs` only parses arguments.
//!
//! Standalone, several clusters: `--config FILE` names the clients (verified client-certificate identities) and
//! what each may write; [`Args::start`] re-reads that file and the TLS files every few seconds and swaps them in.

pub mod authz;
pub mod batch;
pub mod config;
pub mod credentials;
pub mod fencing;
pub mod git;
pub mod grpc;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod names;
pub mod registry;
pub mod reply;
pub mod session;
pub mod tls;
pub mod worker;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Parser;
use sha2::Digest;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::{error, info, warn};

use reverser_common::admin;
use reverser_common::args::{AdminArgs, KubeArgs, LogArgs};
use reverser_common::kube_client::{self, KubeClientError, WithoutKubeconfig};

/// Command-line flags. Every flag can also be set through the environment variable named in `--help`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "reverser-writer",
    version,
    args_override_self = true,
    about = "gitops-reverser writer: commits and pushes what agents stream",
    // The shared flag groups, with the writer's environment variables, defaults and help.
    mut_arg("log_level", |a| a.env("WRITER_LOG_LEVEL")),
    mut_arg("log_format", |a| a.env("WRITER_LOG_FORMAT")),
    mut_arg("admin_addr", |a| a.env("WRITER_ADMIN_ADDR").default_value("0.0.0.0:8081")),
    mut_arg("kubeconfig", |a| a.env("WRITER_KUBECONFIG").visible_alias("lease-kubeconfig").help(
        "Kubeconfig for Leases when not running in a cluster (standalone: coordinate several writers through this \
         cluster's Leases; without it leases are off and the fast-forward-only push is the fence)")),
)]
pub struct Args {
    /// Address of the gRPC server (Writer, WriterAdmin, reflection, health) [default: the config file's
    /// listen.grpcAddr, else 127.0.0.1:9443].
    #[arg(long, env = "WRITER_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Writer configuration file (YAML; see writer/config.example.yaml): TLS, limits, Git credentials and the
    /// clients (client-certificate identities) with what each may write. With it, anything not granted is
    /// denied; it is reloaded when it changes.
    #[arg(long, env = "WRITER_CONFIG")]
    pub config: Option<PathBuf>,
    /// How often the TLS files and --git-credentials are checked for changes when no --config sets
    /// reloadIntervalSec.
    #[arg(long, env = "WRITER_RELOAD_INTERVAL_SEC", default_value_t = 5.0)]
    pub reload_interval_sec: f64,
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
    #[command(flatten)]
    pub admin: AdminArgs,
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
    /// Batches a worker may hold committed but unpushed while more changes wait in its queue; it pushes them all in
    /// one push at this many (or when its queue is empty, or at `--git-push-max-delay-sec`). While that push runs,
    /// as many again may be committed on top of it. 1 = push every batch.
    #[arg(long, env = "WRITER_GIT_PUSH_MAX_BATCHES", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub git_push_max_batches: u64,
    /// Seconds the oldest committed batch may wait for its push while more changes keep arriving (fractions
    /// allowed); 0 = push every batch.
    #[arg(long, env = "WRITER_GIT_PUSH_MAX_DELAY_SEC", default_value_t = 10.0)]
    pub git_push_max_delay_sec: f64,
    /// Orphan files one snapshot may delete; 0 disables orphan deletion.
    #[arg(long, env = "WRITER_DELETES_CAP_PER_CYCLE", default_value_t = 500)]
    pub deletes_cap_per_cycle: usize,
    /// Seconds to wait for a TCP connection to a Git remote.
    #[arg(long, env = "WRITER_GIT_CONNECT_TIMEOUT_SEC", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub git_connect_timeout_sec: u64,
    /// Seconds a read or write on a Git remote's connection may wait without progress (libgit2's socket
    /// timeout; without one a remote that accepts and never answers hangs its worker forever).
    #[arg(long, env = "WRITER_GIT_IO_TIMEOUT_SEC", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub git_io_timeout_sec: u64,
    /// Seconds a whole fetch or push may take (checked whenever the transfer makes progress; a fetch or push still
    /// running 2 s later is abandoned whatever the remote sends, see `worker::watchdog`).
    #[arg(long, env = "WRITER_GIT_OPERATION_TIMEOUT_SEC", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub git_operation_timeout_sec: u64,
    /// MiB of the clones' pack files libgit2 may keep memory-mapped at once, across all workers. Mapped pages count
    /// in the writer's resident memory; above this total the least recently used windows are unmapped (windows are a
    /// quarter of it, 32 MiB at most) and re-read from the page cache when needed again.
    #[arg(long, env = "WRITER_GIT_MAPPED_PACK_LIMIT_MIB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
    pub git_mapped_pack_limit_mib: u64,
    /// On shutdown, seconds the workers get to push what is pending; then the writer exits anyway (what was
    /// not pushed was not acked, so the agents re-send it to the next writer).
    #[arg(long, env = "WRITER_SHUTDOWN_GRACE_SEC", default_value_t = 7)]
    pub shutdown_grace_sec: u64,
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
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Namespace of the Leases (default: the writer's own namespace in-cluster, else `default`).
    #[arg(long, env = "WRITER_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Lease holder identity (default: POD_NAME or the host name, plus a random suffix).
    #[arg(long, env = "WRITER_LEASE_IDENTITY")]
    pub lease_identity: Option<String>,
    /// Renew a held Lease every this many seconds.
    #[arg(long, env = "WRITER_LEASES_RENEW_SEC", default_value_t = 8)]
    pub leases_renew_sec: u64,
    /// Lease duration in seconds (more than --leases-renew-sec; a worker stops pushing `lease − renew` after its
    /// last proven renewal).
    #[arg(long, env = "WRITER_LEASES_LEASE_SEC", default_value_t = 24)]
    pub leases_lease_sec: u64,
    /// Role (in the Lease namespace) that owns every worker Lease: deleting it (helm uninstall) lets the garbage
    /// collector delete the Leases; no Lease is created while it is missing.
    #[arg(long, env = "WRITER_LEASE_OWNER_ROLE")]
    pub lease_owner_role: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
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
        args.log.init()?;
        let running = args.start().await?;
        let shutdown = running.shutdown_handle();
        let stop = reverser_common::shutdown::signal();
        tokio::spawn(async move {
            stop.await;
            info!("shutdown requested; pushing what is pending");
            shutdown.send_replace(true);
        });
        running.wait().await
    }

    fn worker_settings(&self) -> anyhow::Result<worker::WorkerSettings> {
        if !(self.git_batch_max_wait_sec.is_finite() && self.git_batch_max_wait_sec >= 0.0) {
            bail!("--git-batch-max-wait-sec must be a non-negative number");
        }
        if !(self.git_push_max_delay_sec.is_finite() && self.git_push_max_delay_sec >= 0.0) {
            bail!("--git-push-max-delay-sec must be a non-negative number");
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
            push_max_batches: usize::try_from(self.git_push_max_batches).unwrap_or(usize::MAX),
            push_max_delay: Duration::from_secs_f64(self.git_push_max_delay_sec),
            queue_capacity: 1024,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            refetch_after: Duration::from_secs(30),
            ca_cert_file: self.git_ca_file.clone(),
        })
    }

    async fn lease_settings(&self) -> anyhow::Result<Option<lease::LeaseSettings>> {
        if self.leases != LeaseMode::Off && self.leases_renew_sec >= self.leases_lease_sec {
            bail!(
                "--leases-renew-sec ({}) must be less than --leases-lease-sec ({}): a Lease must be renewed before it expires",
                self.leases_renew_sec,
                self.leases_lease_sec
            );
        }
        if self.leases == LeaseMode::Off {
            info!(
                "leases are off (--leases=off): the fast-forward-only push is the only fence between writers"
            );
            return Ok(None);
        }
        let config = match self.kube.config(WithoutKubeconfig::InClusterOnly).await {
            Ok(config) => config,
            Err(KubeClientError::NoCluster(error)) => {
                if self.leases == LeaseMode::On {
                    bail!(
                        "--leases=on but no Kubernetes API is reachable (not in a cluster, no --kubeconfig): {error}"
                    );
                }
                info!("leases are off: not running in a cluster and no --kubeconfig given");
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let namespace = self
            .lease_namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube_client::client(config)?;
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
            owner_role: self
                .lease_owner_role
                .clone()
                .filter(|name| !name.is_empty()),
        }))
    }

    /// Reads the configuration file, the credentials and the TLS files (at start and on every reload).
    fn load_files(&self) -> anyhow::Result<Loaded> {
        let config = self
            .config
            .as_ref()
            .map(|path| config::WriterConfig::load(path))
            .transpose()?;
        let tls_paths = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(tls::TlsPaths {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone().or_else(|| {
                    config
                        .as_ref()
                        .and_then(|c| c.tls.as_ref()?.client_ca.clone())
                }),
            }),
            _ => config.as_ref().and_then(|c| c.tls.clone()),
        };
        if config.is_some() && tls_paths.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            bail!(
                "--config needs TLS with client certificates (tls.cert, tls.key and tls.clientCA in the file, or --tls-cert, --tls-key and --tls-client-ca): client identities come from verified certificates"
            );
        }
        let tls = tls_paths
            .as_ref()
            .map(tls::TlsMaterial::load)
            .transpose()
            .context("loading the TLS files")?;
        let mut credentials = match &self.git_credentials {
            Some(path) => credentials::CredentialStore::load(path)?,
            None => credentials::CredentialStore::default(),
        };
        if let Some(config) = &config {
            credentials = credentials.merged(config.credentials.clone());
        }
        Ok(Loaded {
            config,
            tls_paths,
            tls,
            credentials,
        })
    }

    /// A digest of every file the writer reloads (a missing file counts as a value, too).
    fn files_digest(&self, tls_paths: Option<&tls::TlsPaths>, secret_files: &[PathBuf]) -> Vec<u8> {
        let mut digest = sha2::Sha256::new();
        let mut paths: Vec<&PathBuf> = self
            .config
            .iter()
            .chain(&self.git_credentials)
            .chain(secret_files)
            .collect();
        if let Some(t) = tls_paths {
            paths.extend([&t.cert, &t.key]);
            paths.extend(&t.client_ca);
        }
        for path in paths {
            digest.update(path.as_os_str().as_encoded_bytes());
            match std::fs::read(path) {
                Ok(bytes) => {
                    digest.update([1]);
                    digest.update(sha2::Sha256::digest(&bytes));
                }
                Err(_) => digest.update([0]),
            }
        }
        digest.finalize().to_vec()
    }

    /// Starts every component and returns once the listeners are bound.
    pub async fn start(self) -> anyhow::Result<RunningWriter> {
        // Every flag is handled: a new one does not compile until it is used here or in the helper named.
        let Args {
            grpc_addr,
            config: _, // load_files, files_digest
            reload_interval_sec,
            tls_cert: _,      // load_files
            tls_key: _,       // load_files
            tls_client_ca: _, // load_files
            allow_plaintext,
            admin: AdminArgs {
                admin_addr: admin_addr_wanted,
            },
            work_dir,
            git_credentials: _,     // load_files, files_digest
            git_ca_file: _,         // worker_settings
            git_batch_max_files: _, // worker_settings
            git_batch_max_bytes_mib: _,
            git_batch_max_wait_sec: _,
            git_push_max_batches: _, // worker_settings
            git_push_max_delay_sec: _,
            deletes_cap_per_cycle: _,
            git_connect_timeout_sec,
            git_io_timeout_sec,
            git_operation_timeout_sec,
            git_mapped_pack_limit_mib,
            shutdown_grace_sec,
            commit_name: _, // worker_settings
            commit_email: _,
            max_object_bytes,
            workers_max_global,
            workers_max_per_repo,
            push_max_retries: _, // worker_settings
            leases: _,           // lease_settings
            kube: _,
            lease_namespace: _,
            lease_identity: _,
            leases_renew_sec: _,
            leases_lease_sec: _,
            lease_owner_role: _,
            log: _, // parse_and_run
        } = self.clone();
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Before any worker exists (the settings are process-wide; the first start in a process wins).
        git::set_process_options(
            git::NetworkTimeouts {
                connect: Duration::from_secs(git_connect_timeout_sec),
                io: Duration::from_secs(git_io_timeout_sec),
                operation: Duration::from_secs(git_operation_timeout_sec),
            },
            git::MappedPackLimit {
                total: usize::try_from(git_mapped_pack_limit_mib << 20).unwrap_or(usize::MAX),
            },
        )
        .context("setting libgit2's process options")?;
        let shutdown_grace = Duration::from_secs(shutdown_grace_sec);
        let loaded = self.load_files()?;
        let grpc_addr_wanted = grpc_addr
            .or_else(|| loaded.config.as_ref().and_then(|c| c.grpc_addr))
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 9443)));
        if loaded.tls.is_none() && !grpc_addr_wanted.ip().is_loopback() && !allow_plaintext {
            bail!(
                "refusing to serve plaintext gRPC on {grpc_addr_wanted} (not a loopback address): give --tls-cert/--tls-key, or --allow-plaintext"
            );
        }
        let reload_interval = match &loaded.config {
            Some(config) => config.reload_interval,
            None if reload_interval_sec.is_finite() && reload_interval_sec > 0.0 => {
                Duration::from_secs_f64(reload_interval_sec)
            }
            None => bail!("--reload-interval-sec must be a positive number"),
        };
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating --work-dir {}", work_dir.display()))?;
        // Two writers on one work dir would corrupt each other's clones: hold an exclusive lock for the process
        // lifetime (released by the OS even after kill -9).
        let work_dir_lock =
            std::fs::File::create(work_dir.join(".writer.lock")).with_context(|| {
                format!(
                    "creating the lock file in --work-dir {}",
                    work_dir.display()
                )
            })?;
        if work_dir_lock.try_lock().is_err() {
            bail!(
                "another reverser-writer is using --work-dir {}",
                work_dir.display()
            );
        }
        let Loaded {
            config,
            tls_paths,
            tls,
            credentials,
        } = loaded;
        let secret_files = credentials.source_files().to_vec();
        let metrics = metrics::Metrics::default();
        let registry = registry::Registry::new(
            self.worker_settings()?,
            registry::Caps {
                max_global: workers_max_global,
                max_per_repo: workers_max_per_repo,
            },
            credentials,
            self.lease_settings().await?,
            metrics.clone(),
        );
        let tls = tls
            .map(tls::ReloadableTls::new)
            .transpose()
            .context("configuring TLS")?
            .map(Arc::new);
        let policy = config.as_ref().map(|c| {
            info!(path = %c.path.display(), clients = c.policy.clients.len(), "writer configuration loaded: only granted clients may write");
            tokio::sync::watch::channel(Arc::new(c.policy.clone()))
        });
        let (policy_tx, policy_rx) = match policy {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };

        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let readiness = admin::Readiness::default();
        let admin_shutdown = wait_for(shutdown_rx.clone());
        let (admin_addr, _admin) = admin::serve(
            admin_addr_wanted,
            metrics.registry.clone(),
            readiness.clone(),
            admin_shutdown,
        )
        .await
        .with_context(|| format!("binding --admin-addr {}", admin_addr_wanted))?;

        let max_message = config
            .as_ref()
            .and_then(|c| c.policy.limits.max_message_bytes)
            .unwrap_or_else(|| max_object_bytes.saturating_add(64 * 1024));
        let writer = grpc::WriterService {
            registry: registry.clone(),
            metrics: metrics.clone(),
            limits: session::SessionLimits {
                max_object_bytes,
                max_message_bytes: max_message,
            },
            shutdown: shutdown_rx.clone(),
            policy: policy_rx.clone(),
            clients: Arc::default(),
        };
        let admin_service = grpc::AdminService {
            registry: registry.clone(),
            policy: policy_rx,
        };

        let listener = tokio::net::TcpListener::bind(grpc_addr_wanted)
            .await
            .with_context(|| format!("binding --grpc-addr {grpc_addr_wanted}"))?;
        let grpc_addr = listener.local_addr()?;
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_keepalive(Some(Duration::from_secs(60)));
        if config.is_some() {
            // Streams per connection; streams per identity are capped by limits.maxStreamsPerClient.
            builder = builder.max_concurrent_streams(Some(32));
        }
        if tls.is_none() && !grpc_addr.ip().is_loopback() {
            warn!(%grpc_addr, "serving plaintext gRPC (--allow-plaintext)");
        }
        let router = grpc::routes(&mut builder, writer, admin_service, max_message).await?;
        info!(%grpc_addr, %admin_addr, work_dir = %work_dir.display(), tls = tls.is_some(), "writer listening");
        readiness.set(true);

        // Reload: compare the files' content every interval; a bad new version is logged and the old one stays.
        let reload = {
            let args = self.clone();
            let tls = tls.clone();
            let registry = registry.clone();
            let mut shutdown = shutdown_rx.clone();
            let mut tls_paths = tls_paths;
            let mut secret_files = secret_files;
            let mut last = self.files_digest(tls_paths.as_ref(), &secret_files);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(reload_interval) => {}
                        _ = shutdown.wait_for(|stop| *stop) => break,
                    }
                    let digest = args.files_digest(tls_paths.as_ref(), &secret_files);
                    if digest == last {
                        continue;
                    }
                    match args.load_files().and_then(|loaded| {
                        apply_reload(loaded, tls.as_deref(), policy_tx.as_ref(), &registry)
                    }) {
                        Ok((paths, files)) => {
                            info!("reloaded the writer configuration, credentials and TLS files");
                            tls_paths = paths;
                            secret_files = files;
                            last = args.files_digest(tls_paths.as_ref(), &secret_files);
                        }
                        Err(err) => {
                            error!(
                                error = format!("{err:#}"),
                                "reload failed; the previous configuration and certificates stay in force"
                            );
                            last = digest;
                        }
                    }
                }
            })
        };

        // The whole shutdown (streams' final flushes, then the workers') gets `shutdown_grace` from the request on.
        let grace_over = {
            let requested = shutdown_rx.clone();
            async move {
                wait_for(requested).await;
                tokio::time::sleep(shutdown_grace).await;
            }
        };
        let server_shutdown = wait_for(shutdown_rx);
        let server = tokio::spawn(async move {
            let _work_dir_lock = work_dir_lock;
            tokio::pin!(grace_over);
            let serve = async {
                match tls {
                    Some(tls) => {
                        router
                            .serve_with_incoming_shutdown(
                                tls::incoming(listener, tls, Duration::from_secs(10)),
                                server_shutdown,
                            )
                            .await
                    }
                    None => {
                        router
                            .serve_with_incoming_shutdown(
                                TcpListenerStream::new(listener),
                                server_shutdown,
                            )
                            .await
                    }
                }
                .context("gRPC server failed")
            };
            let mut grace_passed = false;
            tokio::select! {
                served = serve => served?,
                // A stream's final flush waits on its worker, which may wait on a silent remote.
                _ = &mut grace_over => {
                    grace_passed = true;
                    warn!(
                        grace_sec = shutdown_grace.as_secs(),
                        "streams still flushing at the end of the shutdown grace; closing them (the agents re-send what was not acked)"
                    );
                }
            }
            reload.abort();
            readiness.set(false);
            // Streams are gone; let every worker push what it still holds, all at once and for a bounded time: a
            // hung remote must not hold the exit (unpushed changes were not acked; the agents re-send them).
            let (workers, lease_loops) = registry.shutdown();
            drop(registry);
            let mut finals = tokio::task::JoinSet::new();
            for worker in workers {
                finals.spawn(async move {
                    if let Err(error) = worker.shutdown().await {
                        warn!(worker = %worker.id, %error, "final flush failed; the agents will re-send");
                    }
                });
            }
            let finished = !grace_passed
                && tokio::select! {
                    () = async { while finals.join_next().await.is_some() {} } => true,
                    () = &mut grace_over => false,
                };
            if !finished {
                warn!(
                    grace_sec = shutdown_grace.as_secs(),
                    "workers still busy with their remote at the end of the shutdown grace; exiting without them (the agents re-send what was not acked)"
                );
                finals.abort_all();
            }
            // Each worker that ended dropped its Lease state: its loop vacates the Lease, so a successor writer
            // takes over at its next attempt instead of after the expiry (bounded: one request per Lease).
            let released = async {
                for claim_loop in lease_loops {
                    let _ = claim_loop.await;
                }
            };
            if finished
                && tokio::time::timeout(Duration::from_secs(10), released)
                    .await
                    .is_err()
            {
                warn!("Leases not released in time; they expire on their own");
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

/// What [`Args::load_files`] read.
struct Loaded {
    config: Option<config::WriterConfig>,
    tls_paths: Option<tls::TlsPaths>,
    tls: Option<tls::TlsMaterial>,
    credentials: credentials::CredentialStore,
}

/// Swaps reloaded files in; returns the TLS paths and secret files now watched.
fn apply_reload(
    loaded: Loaded,
    tls: Option<&tls::ReloadableTls>,
    policy: Option<&tokio::sync::watch::Sender<Arc<authz::Policy>>>,
    registry: &registry::Registry,
) -> anyhow::Result<(Option<tls::TlsPaths>, Vec<PathBuf>)> {
    match (tls, loaded.tls) {
        (Some(current), Some(material)) => current.update(material)?,
        (None, None) => {}
        _ => bail!("turning TLS on or off needs a restart"),
    }
    if let (Some(sender), Some(config)) = (policy, &loaded.config) {
        sender.send_replace(Arc::new(config.policy.clone()));
    }
    let secret_files = loaded.credentials.source_files().to_vec();
    registry.set_credentials(loaded.credentials);
    Ok((loaded.tls_paths, secret_files))
}

async fn wait_for(mut receiver: tokio::sync::watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use reverser_common::telemetry;

    #[test]
    fn every_flag_has_a_writer_env_var() {
        // The shared flag groups get their variables from `mut_arg`: a group flag without one would be missed here.
        for arg in Args::command().get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("WRITER_")),
                "--{} has no WRITER_* env var",
                arg.get_id()
            );
        }
    }

    #[test]
    fn the_shared_groups_keep_the_writer_defaults_and_alias() {
        let args = Args::try_parse_from(["reverser-writer"]).unwrap();
        assert_eq!(args.admin.admin_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(args.log.log_level, "info");
        assert_eq!(args.kube.kubeconfig, None);
        let args = Args::try_parse_from([
            "reverser-writer",
            "--lease-kubeconfig",
            "/k",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(args.kube.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(args.log.log_format, telemetry::LogFormat::Json);
    }

    #[test]
    fn the_mapped_pack_limit_is_refused_below_16_mib_and_sets_windows_of_a_quarter() {
        let parse = |value: &str| {
            Args::try_parse_from(["reverser-writer", "--git-mapped-pack-limit-mib", value])
                .map(|a| a.git_mapped_pack_limit_mib)
        };
        assert_eq!(
            Args::try_parse_from(["reverser-writer"])
                .unwrap()
                .git_mapped_pack_limit_mib,
            128
        );
        for refused in ["0", "15", "-1", "1048577", "lots"] {
            assert!(parse(refused).is_err(), "{refused} was accepted");
        }
        assert_eq!(parse("16").unwrap(), 16);
        assert_eq!(parse("1048576").unwrap(), 1 << 20);
        let window = |mib: usize| git::MappedPackLimit { total: mib << 20 }.window() >> 20;
        assert_eq!(window(16), 4);
        assert_eq!(window(128), 32);
        assert_eq!(window(1 << 20), 32);
    }
}
