//! [`Args::run`]: builds every component from the flags (each registers its metrics as it is built), then
//! leads terms ([`crate::leader`]) until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use prometheus::{IntCounterVec, Opts, Registry};
use reverser_common::admin;
use reverser_common::args::AdminArgs;
use reverser_common::kube_client::WithoutKubeconfig;
use reverser_common::lease::LeaseConfig;
use tokio::sync::oneshot;
use tracing::info;

use super::Args;
use crate::attribution::Attribution;
use crate::controller::{ControllerConfig, ControllerStats};
use crate::ingest::{DiscoveryOptions, IngestConfig, IngestMetrics, ListPermits, RequestRate};
use crate::kube_events::{EventMetrics, EventSink};
use crate::leader::{self, Election, TermMetrics, TermParts};
use crate::stream::{AgentIdentity, StreamClient, StreamConfig, StreamStats, TlsSettings};
use crate::webhook::{AttributionMetrics, FactStore};

impl Args {
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
            kube,
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
            max_namespaced_watches_per_type,
            max_unacked,
            admin: AdminArgs { admin_addr },
            log: _,
            webhook,
        } = self;
        if leader_election && leader_election_renew_sec >= leader_election_lease_sec {
            bail!("--leader-election-renew-sec must be less than --leader-election-lease-sec");
        }
        let tls = writer_tls(writer_ca, writer_cert, writer_key, writer_tls_domain)?;
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
        let client = kube.client(WithoutKubeconfig::InClusterThenLookup).await?;

        let mut shutdown = Box::pin(shutdown);
        let registry = Registry::new_custom(Some("gitops_reverser_agent".into()), None)?;
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
                attribution_metrics.register(&registry)?;
                Some(FactStore::new(facts_config, attribution_metrics))
            }
            None => None,
        };
        let webhook_parts = webhook_server.zip(attribution.clone());
        let readiness = admin::Readiness::default();
        let (admin_stop, admin_stop_rx) = oneshot::channel::<()>();
        let (bound, admin_task) = admin::serve(
            admin_addr,
            registry.clone(),
            readiness.clone(),
            async move {
                let _ = admin_stop_rx.await;
            },
        )
        .await
        .with_context(|| format!("binding --admin-addr {admin_addr}"))?;
        info!(admin = %bound, %instance_id, "agent starting");

        let cluster_uid = tokio::select! {
            uid = leader::cluster_uid(&client) => uid,
            _ = &mut shutdown => return Ok(()),
        };
        let identity = AgentIdentity {
            cluster_uid,
            cluster_name,
            instance_id: instance_id.clone(),
            controller_namespace: controller_namespace.clone(),
            controller_name,
        };
        let mut stream_config = StreamConfig::new(writer_url, identity);
        let writer_tls = tls.is_some();
        stream_config.tls = tls;
        // Kubernetes Events on the custom resources (one publisher for the process, whatever the leader term).
        let event_metrics = EventMetrics::new()?;
        event_metrics.register(&registry)?;
        let events = EventSink::spawn(client.clone(), instance_id.clone(), event_metrics);
        stream_config.max_unacked = usize::try_from(max_unacked).unwrap_or(usize::MAX);
        stream_config.objects_too_large = Some(objects_too_large(&registry)?);
        let stream_stats = Arc::new(StreamStats::default());
        stream_stats.register(&registry)?;
        stream_config.stats = Some(stream_stats);
        // Invalid URLs or TLS settings are the only fatal stream errors: fail at start.
        StreamClient::new(stream_config.clone()).context("writer connection settings")?;
        let ingest_metrics = Arc::new(IngestMetrics::default());
        ingest_metrics.register(&registry)?;
        let ingest = IngestConfig {
            discovery: DiscoveryOptions {
                watch_all,
                exclude: discovery_exclude,
                sensitive: sensitive_resources,
                max_namespaced_watches_per_type,
                ..DiscoveryOptions::default()
            },
            discovery_refresh,
            selection_options: crate::rules::SelectionOptions {
                keep_controller_owned,
                keep_kube_root_ca,
            },
            attribution: attribution
                .clone()
                .map(|store| Arc::new(store) as Arc<dyn Attribution>),
            request_rate: RequestRate {
                qps: watch_qps,
                burst: watch_burst,
            },
            list_permits: ListPermits::new(
                usize::try_from(max_concurrent_lists).unwrap_or(usize::MAX),
            ),
            metrics: Some(ingest_metrics),
            ..IngestConfig::default()
        };
        let controller_stats = Arc::new(ControllerStats::default());
        controller_stats.register(&registry)?;
        let controller = ControllerConfig {
            namespace: controller_namespace.clone(),
            encryption_refresh,
            writer_tls,
            events: Some(events),
            stats: Some(controller_stats),
            ..ControllerConfig::default()
        };
        let parts = Arc::new(TermParts {
            client,
            stream: stream_config,
            controller,
            ingest,
            registration,
            metrics: TermMetrics::register(&registry)?,
            readiness: readiness.clone(),
        });
        // A standby is ready; a leader once its controller published a selection.
        readiness.set(true);
        let election = if leader_election {
            Election::On(LeaseConfig {
                namespace: leader_election_namespace.unwrap_or(controller_namespace),
                name: leader_election_name,
                // Two replicas may share a host name (or a POD_NAME after a bad template): the
                // Lease identity must be unique per process.
                identity: format!("{instance_id}-{:06x}", rand::random::<u32>() & 0xff_ffff),
                lease_duration: Duration::from_secs(leader_election_lease_sec),
                renew_every: Duration::from_secs(leader_election_renew_sec),
                owner_role: leader_election_owner_role.filter(|name| !name.is_empty()),
            })
        } else {
            Election::Off
        };
        let result = leader::lead(parts, election, webhook_parts, shutdown).await;
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        info!("agent stopped");
        result
    }
}

/// `--writer-ca` (and the client certificate) read now: a missing file fails the start.
fn writer_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    domain: Option<String>,
) -> anyhow::Result<Option<TlsSettings>> {
    let read = |path: &PathBuf, flag: &str| {
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    let Some(ca) = ca else { return Ok(None) };
    Ok(Some(TlsSettings {
        ca_pem: read(&ca, "--writer-ca")?,
        client_cert_pem: cert
            .as_ref()
            .map(|p| read(p, "--writer-cert"))
            .transpose()?,
        client_key_pem: key.as_ref().map(|p| read(p, "--writer-key")).transpose()?,
        domain,
    }))
}

/// `stream_objects_too_large_total{destination}`, incremented by the stream itself.
fn objects_too_large(registry: &Registry) -> anyhow::Result<IntCounterVec> {
    let counter = IntCounterVec::new(
        Opts::new(
            "stream_objects_too_large_total",
            "Objects not sent because they exceed the writer's message or object size limit, per destination \
             (the destination's ObjectsSkipped condition names them)",
        ),
        &["destination"],
    )?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
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
