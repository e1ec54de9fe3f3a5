//! The `reverser-agent` process: flags, and the wiring of leader election, the controller,
//! ingestion and the stream to the writer.
//!
//! ```text
//!                    ┌────────────────────── one leader term (Session) ───────────────────────┐
//! Lease ──leading──▶ │ controller ──Selection (watch)──▶ ingestion ──AgentEvent──▶ counter ──▶ │──▶ stream ──▶ writer
//! (common::lease)    │  (CRs → resolve → /status)         ▲ restarted on a           (events_total)│      │
//!                    │      ▲                             └─ stream reconnect ◀── Feedback ◀─────┼──────┘
//!                    │      └──── WriterView (watch): statuses, rejects, connection ◀──┘          │
//!                    └────────────────────────────────────────────────────────────────────────┘
//! admin: /metrics (counters folded across terms), /healthz, /readyz
//! webhook (--webhook-addr, leader only) ──facts──▶ FactStore (one per process, kept across terms) ──▶ ingestion
//!   (authors); with --webhook-manage-configuration the leader applies the webhook configuration
//! ```
//!
//! Metrics, all prefixed `gitops_reverser_agent_` (`promtool check metrics` accepts them, tested):
//! `leader`; `events_total{kind}` (what ingestion produced); `objects_scanned_total{resource}`,
//! `watch_restarts_total{resource}`, `watch_relists_total{resource}` (`resource` is `plural` or
//! `plural.group`); `active_watches`, `watch_snapshots_completed`, `watch_errors_total`,
//! `encryption_failures_total`, `snapshots_withheld_total`,
//! `discovery_runs_total`, `discovery_errors_total`, `ingestion_restarts_total`;
//! `stream_connected`, `stream_unacked`, `stream_messages_sent_total`, `_acked_total`,
//! `_rejected_total`, `stream_reconnects_total`, `stream_snapshots_abandoned_total`,
//! `stream_objects_too_large_total{destination}`,
//! `stream_feedback_dropped_total`; `resolutions_total`, `status_writes_total`,
//! `status_write_errors_total`; `kube_events_total{type}`, `kube_events_dropped_total{why}`
//! ([`crate::kube_events`]).
//!
//! The stream's [`Feedback`] (writer statuses, rejects, connection state) is folded into a
//! [`WriterView`] that the controller turns into status conditions
//! ([`crate::conditions`]); a reconnect also restarts ingestion.
//!
//! A term starts when this process acquires the Lease and is aborted the moment it loses it:
//! the stream task is dropped, so nothing more reaches the writer from a former leader. On
//! SIGTERM the term stops gracefully (ingestion first, then the stream waits briefly for acks),
//! the Lease is released and the Pod's leader label removed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use reverser_common::lease::{self, LeaseConfig};
use reverser_common::{admin, telemetry};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::conditions::WriterView;
use crate::controller::{self, ControllerConfig, ControllerHandle, ControllerStats};
use crate::events::AgentEvent;
use crate::ingest::{
    self, DiscoveryOptions, IngestConfig, IngestHandle, ListPermits, RequestRate, ResourceTotals,
    Selection,
};
use crate::kube_events::{EventMetrics, EventSink};
use crate::stream::{
    AgentIdentity, Feedback, LeaderFence, StreamClient, StreamConfig, StreamStats, TlsSettings,
};
use crate::webhook::{self, AttributionMetrics, FactStore, registration::Registration};

/// Label the leader puts on its own Pod (removed when it steps down).
pub const LEADER_LABEL: &str = "configbutler.ai/leader";

/// Command-line flags. Every flag can also be set through the environment variable named in `--help`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "reverser-agent",
    version,
    args_override_self = true,
    about = "gitops-reverser agent: mirrors a cluster's desired state to the writer"
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
    /// Kubeconfig to use (default: in-cluster, else the usual kubeconfig lookup).
    #[arg(long, env = "AGENT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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
    /// Messages sent but not acked before the agent stops reading (backpressure).
    #[arg(long, env = "AGENT_MAX_UNACKED", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_unacked: u64,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "AGENT_ADMIN_ADDR", default_value = "0.0.0.0:8082")]
    pub admin_addr: SocketAddr,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "AGENT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "AGENT_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Plain)]
    pub log_format: telemetry::LogFormat,
    /// The attribution webhook (who made a change).
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
}

/// `300` (seconds), `500ms`, `90s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 30s, 5m, 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration unit {unit:?} in {text:?}")),
    };
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

impl Args {
    /// Parses the flags, sets up logging and runs until SIGTERM/ctrl-c.
    pub async fn parse_and_run() -> anyhow::Result<()> {
        let args = Args::parse();
        telemetry::init(&args.log_level, args.log_format)?;
        let stop = reverser_common::shutdown::signal();
        args.run(async {
            stop.await;
            info!("shutdown signal received");
        })
        .await
    }

    /// Runs until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            writer_url,
            writer_ca,
            writer_cert,
            writer_key,
            writer_tls_domain,
            cluster_name,
            instance_id,
            controller_namespace,
            controller_name,
            kubeconfig,
            leader_election,
            leader_election_namespace,
            leader_election_name,
            leader_election_lease_sec,
            leader_election_renew_sec,
            leader_election_owner_role,
            watch_all,
            discovery_exclude,
            sensitive_resources,
            encryption_refresh,
            keep_controller_owned,
            keep_kube_root_ca,
            discovery_refresh,
            watch_qps,
            watch_burst,
            max_concurrent_lists,
            max_unacked,
            admin_addr,
            log_level: _,
            log_format: _,
            webhook,
        } = self;
        if leader_election && leader_election_renew_sec >= leader_election_lease_sec {
            bail!("--leader-election-renew-sec must be less than --leader-election-lease-sec");
        }
        let read = |path: &PathBuf, flag: &str| {
            std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
        };
        let tls = match &writer_ca {
            Some(ca) => Some(TlsSettings {
                ca_pem: read(ca, "--writer-ca")?,
                client_cert_pem: writer_cert
                    .as_ref()
                    .map(|p| read(p, "--writer-cert"))
                    .transpose()?,
                client_key_pem: writer_key
                    .as_ref()
                    .map(|p| read(p, "--writer-key"))
                    .transpose()?,
                domain: writer_tls_domain,
            }),
            None => None,
        };
        // Sensitive types are never attributed: the webhook hashes nothing of them and the managed
        // configuration does not list them (the same matching as ingestion's, see `is_sensitive_resource`).
        let (webhook_server, facts_config) = webhook.configs(&sensitive_resources)?;
        let registration = webhook
            .registration(
                &controller_name,
                &controller_namespace,
                &sensitive_resources,
            )
            .context("--webhook-manage-configuration")?;
        let instance_id = instance_id
            .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(hostname);
        let client = kube_client(kubeconfig.as_ref()).await?;

        let mut shutdown = Box::pin(shutdown);
        let metrics = Metrics::new()?;
        // Attribution: one store per process, kept across leader terms. Only the leader serves the
        // webhook (a standby answers nothing on its port); the certificate is checked now, so a bad
        // one fails the start rather than a later term.
        let attribution = match &webhook_server {
            Some(server_config) => {
                reverser_common::tls::certified_key(
                    &server_config.cert_file,
                    &server_config.key_file,
                    &rustls::crypto::ring::default_provider(),
                )
                .context("loading the attribution webhook's certificate")?;
                let attribution_metrics = AttributionMetrics::new()?;
                attribution_metrics.register(&metrics.registry)?;
                Some(FactStore::new(facts_config, attribution_metrics))
            }
            None => None,
        };
        let webhook_parts = webhook_server.zip(attribution.clone());
        let readiness = admin::Readiness::default();
        let (admin_stop, admin_stop_rx) = oneshot::channel::<()>();
        let (bound, admin_task) = admin::serve(
            admin_addr,
            metrics.registry.clone(),
            readiness.clone(),
            async move {
                let _ = admin_stop_rx.await;
            },
        )
        .await
        .with_context(|| format!("binding --admin-addr {admin_addr}"))?;
        info!(admin = %bound, %instance_id, "agent starting");

        let cluster_uid = tokio::select! {
            uid = cluster_uid(&client) => uid,
            _ = &mut shutdown => return Ok(()),
        };
        let mut stream_config = StreamConfig::new(
            writer_url,
            AgentIdentity {
                cluster_uid,
                cluster_name,
                instance_id: instance_id.clone(),
                controller_namespace: controller_namespace.clone(),
                controller_name,
            },
        );
        let writer_tls = tls.is_some();
        stream_config.tls = tls;
        // Kubernetes Events on the custom resources (one publisher for the process, whatever the leader term).
        let event_metrics = EventMetrics::new()?;
        event_metrics.register(&metrics.registry)?;
        let events = EventSink::spawn(client.clone(), instance_id.clone(), event_metrics);
        stream_config.max_unacked = usize::try_from(max_unacked).unwrap_or(usize::MAX);
        stream_config.objects_too_large = Some(metrics.objects_too_large.clone());
        // Invalid URLs or TLS settings are the only fatal stream errors: fail at start.
        StreamClient::new(stream_config.clone()).context("writer connection settings")?;
        let ingest_config = IngestConfig {
            discovery: DiscoveryOptions {
                watch_all,
                exclude: discovery_exclude,
                sensitive: sensitive_resources,
                ..DiscoveryOptions::default()
            },
            discovery_refresh,
            selection_options: crate::rules::SelectionOptions {
                keep_controller_owned,
                keep_kube_root_ca,
            },
            attribution,
            request_rate: RequestRate {
                qps: watch_qps,
                burst: watch_burst,
            },
            list_permits: ListPermits::new(
                usize::try_from(max_concurrent_lists).unwrap_or(usize::MAX),
            ),
            ..IngestConfig::default()
        };
        let parts = Arc::new(Parts {
            client: client.clone(),
            stream: stream_config,
            controller: ControllerConfig {
                namespace: controller_namespace.clone(),
                encryption_refresh,
                writer_tls,
                events: Some(events),
                ..ControllerConfig::default()
            },
            ingest: ingest_config,
            metrics: metrics.clone(),
            registration,
        });
        let pump = tokio::spawn(metrics.clone().pump(readiness.clone()));

        let mut webhook_handle = None;
        if !leader_election {
            metrics.leader.set(1);
            webhook_handle = start_webhook(webhook_parts.as_ref()).await;
            let session = Session::start(&parts, None);
            shutdown.await;
            session.stop().await;
        } else {
            let config = LeaseConfig {
                namespace: leader_election_namespace.unwrap_or(controller_namespace),
                name: leader_election_name,
                // Two replicas may share a host name (or a POD_NAME after a bad template): the
                // Lease identity must be unique per process.
                identity: format!("{instance_id}-{:06x}", rand::random::<u32>() & 0xff_ffff),
                lease_duration: Duration::from_secs(leader_election_lease_sec),
                renew_every: Duration::from_secs(leader_election_renew_sec),
                owner_role: leader_election_owner_role.filter(|name| !name.is_empty()),
            };
            info!(lease = %config.name, namespace = %config.namespace, identity = %config.identity, "leader election on");
            let (mut lease_state, election) = lease::spawn(client.clone(), config.clone());
            loop {
                // The term this process leads in: every stream of the session names it, and sends only while the
                // Lease is provably still ours.
                let term = tokio::select! {
                    _ = &mut shutdown => break,
                    state = lease_state.wait_for(|state| state.tenure.is_some()) => match state {
                        Ok(state) => state.tenure.clone(),
                        Err(_) => bail!("leader election stopped"),
                    },
                };
                let fence = term.map(|term| LeaderFence {
                    term,
                    lease: lease_state.clone(),
                });
                metrics.leader.set(1);
                // Listening before the label: the Service routes to the labelled Pod at once.
                webhook_handle = start_webhook(webhook_parts.as_ref()).await;
                label_own_pod(&client, true).await;
                let session = Session::start(&parts, fence);
                let stop = tokio::select! {
                    _ = &mut shutdown => true,
                    _ = lease_state.wait_for(|state| state.tenure.is_none()) => false,
                };
                metrics.leader.set(0);
                if stop {
                    session.stop().await;
                    election.abort();
                    if let Err(error) = lease::release(&client, &config).await {
                        warn!(%error, "could not release the leader lease; it expires on its own");
                    }
                    label_own_pod(&client, false).await;
                    break;
                }
                warn!("lost the leader lease: stopping at once");
                session.abort();
                label_own_pod(&client, false).await;
                if let Some(handle) = webhook_handle.take() {
                    handle.shutdown().await;
                }
            }
            election.abort();
        }
        pump.abort();
        if let Some(handle) = webhook_handle.take() {
            handle.shutdown().await;
        }
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        info!("agent stopped");
        Ok(())
    }
}

/// What every leader term is built from.
struct Parts {
    client: kube::Client,
    stream: StreamConfig,
    controller: ControllerConfig,
    ingest: IngestConfig,
    metrics: Metrics,
    /// The webhook configuration to keep in sync with the watched types while leading.
    registration: Option<Registration>,
}

/// Starts the attribution webhook for a leader term (or the whole run without leader election). A failure (the
/// port still held, say) is logged and the term goes on without it: changes are then the bot's, never lost.
async fn start_webhook(
    parts: Option<&(webhook::WebhookConfig, FactStore)>,
) -> Option<webhook::WebhookHandle> {
    let (config, store) = parts?;
    match webhook::spawn(config.clone(), store.clone()).await {
        Ok(handle) => Some(handle),
        Err(error) => {
            warn!(%error, "the attribution webhook could not start; changes of this term are the bot's");
            None
        }
    }
}

/// While leading: server-side applies the `ValidatingWebhookConfiguration` whenever the set of
/// watched types changes (and once at the start of each term), so the API server calls the
/// webhook for exactly the types a watch can attribute.
async fn sync_webhook_configuration(
    client: kube::Client,
    registration: Registration,
    live: Arc<Live>,
) {
    let mut applied: Option<std::collections::BTreeSet<crate::rules::ResourceKey>> = None;
    let mut backoff =
        ingest::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut delay = Duration::from_secs(1);
    let mut checked = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(delay).await;
        delay = Duration::from_secs(1);
        // Before the controller published its first selection, ingestion plans nothing: do
        // not narrow a configuration a former leader left right to nothing.
        if !*live.synced.borrow() {
            continue;
        }
        let Some(types) = live.watched_types() else {
            continue;
        };
        // Deleted behind our back (for example by the `helm upgrade` that handed the
        // configuration over from the chart): apply it again.
        if applied.is_some() && checked.elapsed() >= WEBHOOK_CONFIGURATION_CHECK {
            checked = tokio::time::Instant::now();
            if let Ok(false) = webhook::registration::exists(&client, &registration.name).await {
                info!(name = %registration.name, "webhook configuration missing; applying it again");
                applied = None;
            }
        }
        if applied.as_ref() == Some(&types) {
            continue;
        }
        match webhook::registration::apply(&client, &registration, &types, FIELD_MANAGER).await {
            Ok(webhook::registration::Applied::Applied) => {
                info!(name = %registration.name, types = types.len(), "webhook configuration applied");
                applied = Some(types);
                checked = tokio::time::Instant::now();
                backoff.reset();
            }
            Ok(webhook::registration::Applied::OwnerMissing) => {
                delay = backoff.next_delay();
                info!(name = %registration.name, owner = ?registration.owner_cluster_role, retry_in = ?delay,
                      "the webhook configuration's owner ClusterRole does not exist (being uninstalled?); not applying");
            }
            Err(error) => {
                delay = backoff.next_delay();
                warn!(name = %registration.name, %error, retry_in = ?delay, "applying the webhook configuration failed");
            }
        }
    }
}

/// How often the leader checks that the configuration it applied still exists.
const WEBHOOK_CONFIGURATION_CHECK: Duration = Duration::from_secs(15);

/// Field manager of what the agent applies.
const FIELD_MANAGER: &str = "gitops-reverser";

/// Watches CustomResourceDefinitions and asks ingestion to re-run discovery when one is added, changed or
/// deleted, so a new CRD's objects are mirrored without waiting for `--discovery-refresh`.
async fn refresh_discovery_on_crd_changes(client: kube::Client, live: Arc<Live>) {
    use futures::StreamExt;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let (mut synced, mut first_list) = (false, true);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                synced = true;
                if !std::mem::replace(&mut first_list, false) {
                    live.refresh_discovery();
                }
            }
            // A relist after a watch error may have missed changes: refresh once it completes.
            Ok(watcher::Event::Init) => synced = false,
            Ok(watcher::Event::Apply(crd) | watcher::Event::Delete(crd)) if synced => {
                info!(crd = %crd.metadata.name.as_deref().unwrap_or_default(), "a CRD changed; refreshing discovery");
                live.refresh_discovery();
                // The API server publishes a new group in discovery a moment after the CRD is Established (seen on
                // kube-apiserver v1.37): look again shortly, or the type waits for --discovery-refresh.
                let later = Arc::clone(&live);
                tokio::spawn(async move {
                    for delay in [Duration::from_secs(2), Duration::from_secs(8)] {
                        tokio::time::sleep(delay).await;
                        later.refresh_discovery();
                    }
                });
            }
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "watching CustomResourceDefinitions failed; discovery still refreshes on its timer")
            }
        }
    }
}

/// One leader term: controller, ingestion, the event counter, the stream and its feedback.
struct Session {
    live: Arc<Live>,
    controller: ControllerHandle,
    forwarder: JoinHandle<()>,
    /// Refreshes discovery as soon as a CRD appears, changes or goes (instead of waiting for the timer).
    crd_watch: JoinHandle<()>,
    /// Keeps the webhook configuration listing the watched types (`--webhook-manage-configuration`).
    webhook_sync: Option<JoinHandle<()>>,
    feedback: JoinHandle<()>,
    stream: JoinHandle<()>,
    stop_stream: oneshot::Sender<()>,
    grace: Duration,
    metrics: Metrics,
}

/// What `/metrics` reads from the running term.
struct Live {
    ingest: Mutex<Option<IngestHandle>>,
    /// Counters of ingestion instances replaced during this term.
    ingest_base: Mutex<Totals>,
    stream: Arc<StreamStats>,
    controller: Arc<ControllerStats>,
    synced: watch::Receiver<bool>,
}

impl Live {
    fn totals(&self) -> Totals {
        let mut t = self
            .ingest_base
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = self
            .ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            t.add_ingest(h);
        }
        t.sent += self.stream.sent();
        t.acked += self.stream.acked();
        t.rejected += self.stream.rejected();
        t.reconnects += self.stream.reconnects();
        t.abandoned += self.stream.snapshots_abandoned();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        t.status_writes += load(&self.controller.status_writes);
        t.status_write_errors += load(&self.controller.status_write_errors);
        t.resolutions += load(&self.controller.resolutions);
        t.feedback_dropped += self.stream.feedback_dropped();
        t
    }

    /// The types ingestion watches now (`None` before its first plan).
    fn watched_types(&self) -> Option<std::collections::BTreeSet<crate::rules::ResourceKey>> {
        self.ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(IngestHandle::watched_types)
    }

    /// Replaces ingestion: a new instance relists every scope, opening fresh snapshot epochs.
    fn refresh_discovery(&self) {
        if let Some(handle) = self
            .ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            handle.refresh_discovery();
        }
    }

    fn replace_ingest(&self, next: IngestHandle) {
        let mut slot = self.ingest.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.take() {
            self.ingest_base
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add_ingest(&old);
            // Dropping the handle aborts its supervisor and every watch.
        }
        *slot = Some(next);
    }
}

impl Session {
    fn start(parts: &Arc<Parts>, fence: Option<LeaderFence>) -> Session {
        let (selection_tx, selection_rx) = watch::channel(Arc::new(Selection::default()));
        // What the writer reports in this term; the controller turns it into status conditions.
        let (writer_view_tx, writer_view_rx) = watch::channel(WriterView::default());
        let controller = controller::spawn_with_writer(
            parts.client.clone(),
            parts.controller.clone(),
            selection_tx,
            writer_view_rx,
        );
        let (ingest_tx, mut ingest_rx) = mpsc::channel::<AgentEvent>(1024);
        let (events_tx, events_rx) = mpsc::channel::<AgentEvent>(1024);
        let (feedback_tx, mut feedback_rx) = mpsc::channel::<Feedback>(256);
        let mut stream_config = parts.stream.clone();
        stream_config.fence = fence;
        let client = StreamClient::new(stream_config).expect("validated at start");
        let live = Arc::new(Live {
            ingest: Mutex::new(None),
            ingest_base: Mutex::new(Totals::default()),
            stream: client.stats(),
            controller: controller.stats(),
            synced: controller.synced(),
        });
        live.replace_ingest(ingest::spawn(
            parts.client.clone(),
            parts.ingest.clone(),
            selection_rx.clone(),
            ingest_tx.clone(),
        ));
        parts.metrics.set_live(Some(Arc::clone(&live)));
        let crd_watch = tokio::spawn(refresh_discovery_on_crd_changes(
            parts.client.clone(),
            Arc::clone(&live),
        ));
        let webhook_sync = parts.registration.clone().map(|registration| {
            tokio::spawn(sync_webhook_configuration(
                parts.client.clone(),
                registration,
                Arc::clone(&live),
            ))
        });

        // Counts what ingestion produces; both channels are bounded, so backpressure from the
        // stream still reaches the watches.
        let events_total = parts.metrics.events.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(event) = ingest_rx.recv().await {
                let kind = match &event {
                    AgentEvent::Destination(_) => "destination",
                    AgentEvent::Upsert { .. } => "upsert",
                    AgentEvent::Delete { .. } => "delete",
                    AgentEvent::SnapshotBegin { .. } => "snapshot_begin",
                    AgentEvent::SnapshotEnd { .. } => "snapshot_end",
                };
                events_total.with_label_values(&[kind]).inc();
                if events_tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        let (stop_stream, stop_rx) = oneshot::channel::<()>();
        let grace = parts.stream.shutdown_grace;
        let stream = client.spawn(events_rx, feedback_tx, async move {
            let _ = stop_rx.await;
        });

        let feedback_live = Arc::clone(&live);
        let feedback_parts = Arc::clone(parts);
        let feedback = tokio::spawn(async move {
            while let Some(feedback) = feedback_rx.recv().await {
                writer_view_tx.send_if_modified(|view| view.apply(&feedback));
                match feedback {
                    Feedback::Connected => info!("connected to the writer"),
                    Feedback::Reconnected => {
                        // The writer may have lost the open snapshots: relist everything so
                        // that orphans are still found.
                        info!(
                            "reconnected to the writer; restarting ingestion for fresh snapshots"
                        );
                        feedback_parts.metrics.ingestion_restarts.inc();
                        feedback_live.replace_ingest(ingest::spawn(
                            feedback_parts.client.clone(),
                            feedback_parts.ingest.clone(),
                            selection_rx.clone(),
                            ingest_tx.clone(),
                        ));
                    }
                    Feedback::Disconnected { error } => warn!(%error, "writer connection lost"),
                    Feedback::Rejected(r) => warn!(
                        destination = %r.destination, sequence = r.sequence, reason = %r.reason,
                        message = %r.message, "writer rejected a message"
                    ),
                    Feedback::Status(s) => info!(
                        destination = %s.destination, condition = %s.condition_type, status = %s.status,
                        reason = %s.reason, message = %s.message, "destination status"
                    ),
                    Feedback::ObjectsSkipped {
                        destination,
                        objects,
                        total,
                    } => {
                        info!(%destination, total, ?objects, "objects not mirrored for their size")
                    }
                    Feedback::Fenced { message } => warn!(
                        %message,
                        "the writer refused this leader term; waiting for the elector to step down"
                    ),
                    Feedback::SnapshotAbandoned {
                        destination,
                        scope,
                        epoch,
                    } => info!(
                        %destination, resource = %scope.resource, namespace = %scope.namespace, epoch,
                        "snapshot abandoned; orphans of this scope wait for the next relist"
                    ),
                }
            }
        });
        Session {
            live,
            controller,
            forwarder,
            crd_watch,
            webhook_sync,
            feedback,
            stream,
            stop_stream,
            grace,
            metrics: parts.metrics.clone(),
        }
    }

    /// Graceful end (shutdown): stop producing, then give the stream a moment for acks.
    async fn stop(self) {
        let Session {
            live,
            controller,
            forwarder,
            crd_watch,
            webhook_sync,
            feedback,
            mut stream,
            stop_stream,
            grace,
            metrics,
        } = self;
        drop(controller);
        crd_watch.abort();
        if let Some(sync) = webhook_sync {
            sync.abort();
        }
        feedback.abort();
        live.ingest.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = stop_stream.send(());
        if tokio::time::timeout(grace + Duration::from_secs(2), &mut stream)
            .await
            .is_err()
        {
            stream.abort();
        }
        forwarder.abort();
        metrics.end_term(&live);
    }

    /// Immediate end (lost the lease): nothing more may reach the writer from this process.
    fn abort(self) {
        self.stream.abort();
        self.crd_watch.abort();
        if let Some(sync) = &self.webhook_sync {
            sync.abort();
        }
        self.forwarder.abort();
        self.feedback.abort();
        self.live
            .ingest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.metrics.end_term(&self.live);
    }
}

/// Counter values, summed across ingestion instances and leader terms.
#[derive(Clone, Debug, Default)]
struct Totals {
    /// Per `resource` label.
    per_resource: BTreeMap<String, ResourceTotals>,
    discovery_runs: u64,
    discovery_errors: u64,
    watch_errors: u64,
    encryption_failures: u64,
    snapshots_withheld: u64,
    sent: u64,
    acked: u64,
    rejected: u64,
    reconnects: u64,
    abandoned: u64,
    status_writes: u64,
    status_write_errors: u64,
    feedback_dropped: u64,
    resolutions: u64,
}

impl Totals {
    fn add_ingest(&mut self, handle: &IngestHandle) {
        let m = handle.metrics();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        self.discovery_runs += load(&m.discovery_runs);
        self.discovery_errors += load(&m.discovery_errors);
        self.watch_errors += load(&m.watch_errors);
        self.encryption_failures += load(&m.encryption_failures);
        self.snapshots_withheld += load(&m.snapshots_withheld);
        for (label, counts) in m.per_resource() {
            self.per_resource.entry(label).or_default().add(&counts);
        }
    }

    fn add(&mut self, o: &Totals) {
        for (label, counts) in &o.per_resource {
            self.per_resource
                .entry(label.clone())
                .or_default()
                .add(counts);
        }
        self.discovery_runs += o.discovery_runs;
        self.discovery_errors += o.discovery_errors;
        self.watch_errors += o.watch_errors;
        self.encryption_failures += o.encryption_failures;
        self.snapshots_withheld += o.snapshots_withheld;
        self.sent += o.sent;
        self.acked += o.acked;
        self.rejected += o.rejected;
        self.reconnects += o.reconnects;
        self.abandoned += o.abandoned;
        self.status_writes += o.status_writes;
        self.status_write_errors += o.status_write_errors;
        self.feedback_dropped += o.feedback_dropped;
        self.resolutions += o.resolutions;
    }
}

/// Reads one counter's value from the totals.
type ReadTotal = fn(&Totals) -> u64;
/// Reads one per-resource counter's value.
type ReadResourceTotal = fn(&ResourceTotals) -> u64;

/// The agent's Prometheus metrics, all prefixed `gitops_reverser_agent_`.
#[derive(Clone)]
struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    leader: IntGauge,
    ingestion_restarts: IntCounter,
    /// Labelled `destination`; incremented by the stream itself.
    objects_too_large: IntCounterVec,
    state: Arc<Mutex<MetricsState>>,
    counters: Arc<Vec<(IntCounter, ReadTotal)>>,
    /// Labelled `resource`.
    resource_counters: Arc<Vec<(IntCounterVec, ReadResourceTotal)>>,
    active_watches: IntGauge,
    snapshots_completed: IntGauge,
    unacked: IntGauge,
    connected: IntGauge,
}

#[derive(Default)]
struct MetricsState {
    /// Totals of ended terms.
    base: Totals,
    live: Option<Arc<Live>>,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new_custom(Some("gitops_reverser_agent".into()), None)?;
        let events = IntCounterVec::new(
            Opts::new(
                "events_total",
                "Events ingestion produced, by kind (upsert, delete, snapshot_begin, snapshot_end, destination)",
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new("leader", "1 while this process holds the leader lease")?;
        let ingestion_restarts = IntCounter::new(
            "ingestion_restarts_total",
            "Ingestion restarts (full relists) after a writer reconnect",
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let active_watches = gauge("active_watches", "List+Watch loops running")?;
        let snapshots_completed = gauge(
            "watch_snapshots_completed",
            "Completed lists and relists of the running watches",
        )?;
        let unacked = gauge(
            "stream_unacked",
            "Messages sent to the writer and not yet acked",
        )?;
        let connected = gauge("stream_connected", "1 while the stream to the writer is up")?;
        let specs: Vec<(&str, &str, ReadTotal)> = vec![
            (
                "discovery_runs_total",
                "Completed API discovery runs",
                |t| t.discovery_runs,
            ),
            ("discovery_errors_total", "Failed API discovery runs", |t| {
                t.discovery_errors
            }),
            (
                "watch_errors_total",
                "Watch errors (each is retried; a relist follows a 410)",
                |t| t.watch_errors,
            ),
            (
                "encryption_failures_total",
                "Sensitive objects not sent because encrypting them was refused (too large) or failed, per destination",
                |t| t.encryption_failures,
            ),
            (
                "snapshots_withheld_total",
                "Snapshot ends not sent because an object of their scope could not be sent (nothing there is deleted)",
                |t| t.snapshots_withheld,
            ),
            (
                "stream_messages_sent_total",
                "Sequenced messages written to the writer stream, re-sends included",
                |t| t.sent,
            ),
            (
                "stream_messages_acked_total",
                "Messages the writer acked",
                |t| t.acked,
            ),
            (
                "stream_messages_rejected_total",
                "Messages the writer rejected",
                |t| t.rejected,
            ),
            (
                "stream_reconnects_total",
                "Writer stream connections after the first",
                |t| t.reconnects,
            ),
            (
                "stream_snapshots_abandoned_total",
                "Snapshot ends dropped because their epoch did not go out whole",
                |t| t.abandoned,
            ),
            (
                "status_writes_total",
                "Status conditions written to custom resources",
                |t| t.status_writes,
            ),
            ("status_write_errors_total", "Failed status writes", |t| {
                t.status_write_errors
            }),
            (
                "stream_feedback_dropped_total",
                "Writer rejects and statuses dropped because their receiver fell far behind",
                |t| t.feedback_dropped,
            ),
            (
                "resolutions_total",
                "Resolutions of the custom resources into a selection and conditions",
                |t| t.resolutions,
            ),
        ];
        let mut counters = Vec::new();
        for (name, help, read) in specs {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            counters.push((c, read));
        }
        let resource_specs: Vec<(&str, &str, ReadResourceTotal)> = vec![
            (
                "objects_scanned_total",
                "Objects seen by lists and watches (listed, added, modified, deleted), by resource",
                |t| t.objects_scanned,
            ),
            (
                "watch_restarts_total",
                "Watches re-established after an error or an ended stream, by resource",
                |t| t.watch_restarts,
            ),
            (
                "watch_relists_total",
                "Lists after a watch's first one (410 Gone, desync, streaming fallback), by resource",
                |t| t.relists,
            ),
        ];
        let mut resource_counters = Vec::new();
        for (name, help, read) in resource_specs {
            let c = IntCounterVec::new(Opts::new(name, help), &["resource"])?;
            registry.register(Box::new(c.clone()))?;
            resource_counters.push((c, read));
        }
        for g in [
            &leader,
            &active_watches,
            &snapshots_completed,
            &unacked,
            &connected,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(ingestion_restarts.clone()))?;
        let objects_too_large = IntCounterVec::new(
            Opts::new(
                "stream_objects_too_large_total",
                "Objects not sent because they exceed the writer's message or object size limit, per destination \
                 (the destination's ObjectsSkipped condition names them)",
            ),
            &["destination"],
        )?;
        registry.register(Box::new(objects_too_large.clone()))?;
        Ok(Self {
            registry,
            events,
            objects_too_large,
            leader,
            ingestion_restarts,
            state: Arc::default(),
            counters: Arc::new(counters),
            resource_counters: Arc::new(resource_counters),
            active_watches,
            snapshots_completed,
            unacked,
            connected,
        })
    }

    fn set_live(&self, live: Option<Arc<Live>>) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).live = live;
    }

    fn end_term(&self, live: &Arc<Live>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.base.add(&live.totals());
        state.live = None;
    }

    /// Copies the components' atomics into the registry every second, and derives readiness:
    /// a standby is ready; a leader once its controller published a selection.
    async fn pump(self, readiness: admin::Readiness) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (mut totals, live) = {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                (state.base.clone(), state.live.clone())
            };
            match &live {
                Some(live) => {
                    totals.add(&live.totals());
                    let ingest = live.ingest.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(h) = ingest.as_ref() {
                        let watches = h.watch_status();
                        self.active_watches.set(watches.len() as i64);
                        self.snapshots_completed
                            .set(watches.values().map(|s| s.snapshots_completed as i64).sum());
                    }
                    self.unacked.set(live.stream.unacked() as i64);
                    self.connected.set(i64::from(live.stream.connected()));
                    readiness.set(*live.synced.borrow());
                }
                None => {
                    for g in [
                        &self.active_watches,
                        &self.snapshots_completed,
                        &self.unacked,
                        &self.connected,
                    ] {
                        g.set(0);
                    }
                    readiness.set(true);
                }
            }
            for (counter, read) in self.counters.iter() {
                let value = read(&totals);
                let shown = counter.get();
                if value >= shown {
                    counter.inc_by(value - shown);
                }
            }
            for (label, values) in &totals.per_resource {
                for (vec, read) in self.resource_counters.iter() {
                    let counter = vec.with_label_values(&[label.as_str()]);
                    let value = read(values);
                    let shown = counter.get();
                    if value >= shown {
                        counter.inc_by(value - shown);
                    }
                }
            }
        }
    }
}

/// `--kubeconfig`, else in-cluster, else the usual lookup (KUBECONFIG, ~/.kube/config).
async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .context("loading --kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes API: not in a cluster and no kubeconfig found")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// The cluster's identity: the uid of `kube-system` (stable for the cluster's life), else of
/// `default`. Retried until the API answers: without it the writer cannot tell clusters apart.
async fn cluster_uid(client: &kube::Client) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut delay = Duration::from_secs(1);
    loop {
        for name in ["kube-system", "default"] {
            match api.get_opt(name).await {
                Ok(Some(ns)) => {
                    if let Some(uid) = ns.metadata.uid {
                        info!(namespace = name, %uid, "cluster UID");
                        return uid;
                    }
                }
                Ok(None) => {}
                Err(error) => warn!(%error, namespace = name, "reading the cluster UID failed"),
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Sets or removes the leader label on our own Pod, when running in one (`POD_NAME` and
/// `POD_NAMESPACE` from the downward API). Failures only cost the label.
async fn label_own_pod(client: &kube::Client, leader: bool) {
    let (Ok(name), Ok(namespace)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE"))
    else {
        return;
    };
    if name.is_empty() || namespace.is_empty() {
        return;
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let value = if leader {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => info!(pod = %name, leader, "pod leader label updated"),
        Err(error) => warn!(pod = %name, %error, "could not update the pod's leader label"),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "reverser-agent".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_plain_seconds_and_units() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn every_flag_has_an_agent_env_var() {
        use clap::CommandFactory;
        for arg in Args::command().get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("AGENT_")),
                "--{} has no AGENT_* env var",
                arg.get_id()
            );
        }
    }

    #[test]
    fn leader_election_defaults_on_and_can_be_turned_off() {
        let on = Args::try_parse_from(["reverser-agent", "--writer-url", "http://w:1"]).unwrap();
        assert!(on.leader_election);
        let off = Args::try_parse_from([
            "reverser-agent",
            "--writer-url",
            "http://w:1",
            "--leader-election=false",
            "--discovery-exclude",
            "widgets.example.com",
            "--discovery-exclude",
            "leases",
        ])
        .unwrap();
        assert!(!off.leader_election);
        assert_eq!(off.discovery_exclude, vec!["widgets.example.com", "leases"]);
    }
}
