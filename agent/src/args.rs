//! The `reverser-agent` process: its flags, and [`Args::run`], which wires the components together.
//!
//! ```text
//! Lease ──leading──▶ one term (crate::leader): controller ──▶ ingestion ──▶ stream ──▶ writer
//! admin: /metrics (each component registered its families when it was built), /healthz, /readyz
//! webhook (--webhook-addr, leader only) ──facts──▶ FactStore (one per process, kept across terms) ──▶ ingestion
//! ```
//!
//! Metrics, all prefixed `gitops_reverser_agent_` (`promtool check metrics` accepts them, tested):
//! `leader`, `ingestion_restarts_total` and the running term's gauges ([`crate::leader::TermMetrics`]);
//! `discovery_*`, `watch_*`, `objects_scanned_total{resource}`, `encryption_failures_total`,
//! `snapshots_withheld_total` ([`crate::ingest::IngestMetrics::register`]); `stream_*_total`,
//! `events_total{kind}` ([`crate::stream::StreamStats::register`]), `stream_objects_too_large_total{destination}`;
//! `resolutions_total`, `status_writes_total`, `status_write_errors_total`
//! ([`crate::controller::ControllerStats::register`]); `kube_events_*` ([`crate::kube_events`]); the webhook's
//! ([`crate::webhook::AttributionMetrics`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reverser_common::args::{AdminArgs, KubeArgs, LogArgs, parse_duration};
use tracing::info;

use crate::webhook;

/// Command-line flags. Every flag can also be set through the environment variable named in `--help`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "reverser-agent",
    version,
    args_override_self = true,
    about = "gitops-reverser agent: mirrors a cluster's desired state to the writer",
    // The shared flag groups, with the agent's environment variables and defaults.
    mut_arg("log_level", |a| a.env("AGENT_LOG_LEVEL")),
    mut_arg("log_format", |a| a.env("AGENT_LOG_FORMAT")),
    mut_arg("admin_addr", |a| a.env("AGENT_ADMIN_ADDR").default_value("0.0.0.0:8082")),
    mut_arg("kubeconfig", |a| a.env("AGENT_KUBECONFIG")
        .help("Kubeconfig to use (default: in-cluster, else the usual kubeconfig lookup)")),
)]
pub struct Args {
    /// Writer gRPC URL: `http://host:port`, or `https://host:port` with --writer-ca.
    #[arg(long, env = "AGENT_WRITER_URL")]
    pub writer_url: String,
    /// PEM CA bundle the writer's certificate must chain to (TLS).
    #[arg(long, env = "AGENT_WRITER_CA")]
    pub writer_ca: Option<PathBuf>,
    /// PEM client certificate for mTLS to the writer.
    #[arg(long, env = "AGENT_WRITER_CERT", requires_all = ["writer_key", "writer_ca"])]
    pub writer_cert: Option<PathBuf>,
    /// PEM private key for --writer-cert.
    #[arg(long, env = "AGENT_WRITER_KEY", requires = "writer_cert")]
    pub writer_key: Option<PathBuf>,
    /// Name to verify the writer's certificate against, when it differs from the URL's host.
    #[arg(long, env = "AGENT_WRITER_TLS_DOMAIN")]
    pub writer_tls_domain: Option<String>,
    /// Human-readable cluster name (ownership marker, commit trailers).
    #[arg(long, env = "AGENT_CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,
    /// This process's name (default: POD_NAME, else the host name).
    #[arg(long, env = "AGENT_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Namespace of the installation (ownership marker, default Lease namespace).
    #[arg(
        long,
        env = "AGENT_CONTROLLER_NAMESPACE",
        default_value = "gitops-reverser"
    )]
    pub controller_namespace: String,
    /// Name of the installation (ownership marker).
    #[arg(long, env = "AGENT_CONTROLLER_NAME", default_value = "gitops-reverser")]
    pub controller_name: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Elect a leader among replicas through a Lease (`--leader-election=false` to run alone).
    #[arg(long, env = "AGENT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (default: --controller-namespace).
    #[arg(long, env = "AGENT_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "AGENT_LEADER_ELECTION_NAME",
        default_value = "gitops-reverser-agent"
    )]
    pub leader_election_name: String,
    /// Lease duration in seconds.
    #[arg(long, env = "AGENT_LEADER_ELECTION_LEASE_SEC", default_value_t = 24, value_parser = clap::value_parser!(u64).range(2..))]
    pub leader_election_lease_sec: u64,
    /// Renew the Lease every this many seconds (less than the lease duration).
    #[arg(long, env = "AGENT_LEADER_ELECTION_RENEW_SEC", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub leader_election_renew_sec: u64,
    /// Role (in the Lease's namespace) that owns the leader Lease: deleting it (helm uninstall) lets the garbage collector delete the Lease; no Lease is created while it is missing.
    #[arg(long, env = "AGENT_LEADER_ELECTION_OWNER_ROLE")]
    pub leader_election_owner_role: Option<String>,
    /// Rules without `resources` select every discovered type instead of the desired-state preset.
    #[arg(long, env = "AGENT_WATCH_ALL")]
    pub watch_all: bool,
    /// Never watch this type: `plural` (any group) or `plural.group`. Repeatable; comma-separated in the env var.
    #[arg(long, env = "AGENT_DISCOVERY_EXCLUDE", value_delimiter = ',')]
    pub discovery_exclude: Vec<String>,
    /// Types only ever sent SOPS-encrypted, and only to GitDestinations with `spec.encryption`: `plural` (any
    /// group) or `plural.group`. Repeatable; comma-separated in the env var. Core `secrets` always are.
    #[arg(
        long,
        env = "AGENT_SENSITIVE_RESOURCES",
        value_delimiter = ',',
        default_value = "secrets"
    )]
    pub sensitive_resources: Vec<String>,
    /// How often the recipients of encrypting GitDestinations (and their recipients Secrets) and the
    /// GitRepoConfigs' `secretRef` credentials Secrets are re-read (`30s`, `5m`).
    #[arg(long, env = "AGENT_ENCRYPTION_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub encryption_refresh: Duration,
    /// Also mirror objects a controller generated (a controller `ownerReference`: ReplicaSets of Deployments,
    /// Jobs of CronJobs …); skipped by default because their owner is already mirrored.
    #[arg(long, env = "AGENT_KEEP_CONTROLLER_OWNED")]
    pub keep_controller_owned: bool,
    /// Also mirror the `kube-root-ca.crt` ConfigMap the cluster puts in every namespace.
    #[arg(long, env = "AGENT_KEEP_KUBE_ROOT_CA")]
    pub keep_kube_root_ca: bool,
    /// How often discovery looks for new or removed types (`300`, `90s`, `5m`, `1h`).
    #[arg(long, env = "AGENT_DISCOVERY_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub discovery_refresh: Duration,
    /// Requests per second each watched type may make to the API server (list pages, watch restarts,
    /// relists); 0 = unlimited.
    #[arg(long, env = "AGENT_WATCH_QPS", default_value_t = 5.0)]
    pub watch_qps: f64,
    /// Requests each watched type may make at once above --watch-qps.
    #[arg(long, env = "AGENT_WATCH_BURST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub watch_burst: u32,
    /// Initial lists (and relists) in flight at once, over all watched types.
    #[arg(long, env = "AGENT_MAX_CONCURRENT_LISTS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_lists: u64,
    /// A type selected only by WatchRules in more namespaces than this gets one cluster-wide watch instead of one
    /// per namespace (objects of other namespaces are dropped); 0 = always cluster-wide. A type whose cluster-wide
    /// list is forbidden (namespaced RBAC) falls back to one watch per namespace.
    #[arg(long, env = "AGENT_MAX_NAMESPACED_WATCHES_PER_TYPE", default_value_t = crate::ingest::discovery::DEFAULT_MAX_NAMESPACED_WATCHES_PER_TYPE)]
    pub max_namespaced_watches_per_type: usize,
    /// Messages sent but not acked before the agent stops reading (backpressure).
    #[arg(long, env = "AGENT_MAX_UNACKED", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_unacked: u64,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// The attribution webhook (who made a change).
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
}

impl Args {
    /// Parses the flags, sets up logging and runs until SIGTERM/ctrl-c.
    pub async fn parse_and_run() -> anyhow::Result<()> {
        let args = Args::parse();
        args.log.init()?;
        let stop = reverser_common::shutdown::signal();
        args.run(async {
            stop.await;
            info!("shutdown signal received");
        })
        .await
    }
}

mod run;

#[cfg(test)]
mod tests;
