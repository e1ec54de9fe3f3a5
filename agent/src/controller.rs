//! The custom-resource controller: from `GitRepoConfig`, `GitDestination`, `WatchRule`,
//! `ClusterWatchRule` and `Namespace` objects to the [`Selection`] ingestion mirrors, plus the
//! status conditions of every destination and rule ([`crate::conditions`] says which): `Ready`
//! from the configuration and the writer's feedback, the writer's own conditions,
//! `WriterConnected` and `SecretsSkipped`.
//!
//! ```text
//!  API server ──watch──▶ 5 reflector stores ──any event──▶ debounce ──▶ resolve() (pure)
//!  (4 CRDs + Namespaces)                                                 │
//!                 ┌──────────────────────────────────────────────────────┤
//!                 ▼                                                      ▼
//!   watch::Sender<Arc<Selection>> ──▶ ingestion              desired conditions ◀── WriterView
//!   (only when it changed; ingestion                          │ compare with      (writer feedback,
//!    declares the destinations to the                         │ each status        a watch channel:
//!    stream before any change for them)                       ▼                    also a trigger)
//!                                                   merge patch on /status (only on change)
//! ```
//!
//! Nothing is published before every store finished its initial list: a selection resolved from a
//! half-listed cluster would stop watches (and their snapshots) for rules that merely were not
//! listed yet. The controller must only run while its process holds the leader lease; it writes
//! status and never anything else.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::conditions::{
    self, DesiredCondition, DesiredConditions, DestinationReadiness, WriterView,
};
use crate::crd::{ClusterWatchRule, GitDestination, GitRepoConfig, ResourceStatus, WatchRule};
use std::collections::BTreeMap;

use crate::config::Selection;
use crate::config::resolve::{
    CredentialsLookup, EncryptionLookup, Inputs, ReadyCondition, Resolution, resolve_with_lookups,
};
use crate::kube_events::{self, EventSink};
use crate::rules::compiled::NamespaceLabels;

/// The condition type every object gets.
pub const READY: &str = conditions::READY;

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Events arriving within this window are resolved once (an `apply -f dir/` is one burst).
    pub debounce: Duration,
    /// The agent's namespace: where the per-destination fingerprint keys are kept (Secrets
    /// `gitops-reverser-fingerprint-…`).
    pub namespace: String,
    /// How often encrypting destinations' recipients (and recipients Secrets) and the repositories'
    /// `secretRef` credentials Secrets are re-read (a rotated Secret reaches the writer within this).
    pub encryption_refresh: Duration,
    /// Whether the stream to the writer uses TLS. Without it, `secretRef` credentials are never sent.
    pub writer_tls: bool,
    /// Where condition changes become Kubernetes Events (none: no Events).
    pub events: Option<EventSink>,
    /// Counters to add to (the process's, registered once); `None`: counters of this controller alone.
    pub stats: Option<Arc<ControllerStats>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(200),
            namespace: "gitops-reverser".into(),
            encryption_refresh: Duration::from_secs(30),
            writer_tls: false,
            events: None,
            stats: None,
        }
    }
}

/// Counters and state for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct ControllerStats {
    /// `resolve` runs.
    pub resolutions: std::sync::atomic::AtomicU64,
    /// Status patches written.
    pub status_writes: std::sync::atomic::AtomicU64,
    /// Status patches that failed (retried on the next change).
    pub status_write_errors: std::sync::atomic::AtomicU64,
}

impl ControllerStats {
    /// Registers `resolutions_total`, `status_writes_total` and `status_write_errors_total` in `registry`.
    pub fn register(
        self: &Arc<Self>,
        registry: &prometheus::Registry,
    ) -> Result<(), prometheus::Error> {
        let read = |field: fn(&ControllerStats) -> &std::sync::atomic::AtomicU64| {
            let stats = Arc::clone(self);
            move || field(&stats).load(std::sync::atomic::Ordering::Relaxed)
        };
        crate::metrics::ScrapedFamilies::new()
            .counter(
                "resolutions_total",
                "Resolutions of the custom resources into a selection and conditions",
                read(|s| &s.resolutions),
            )?
            .counter(
                "status_writes_total",
                "Status conditions written to custom resources",
                read(|s| &s.status_writes),
            )?
            .counter(
                "status_write_errors_total",
                "Failed status writes",
                read(|s| &s.status_write_errors),
            )?
            .register(registry)
    }
}

/// A running controller; dropping it stops the watches.
#[derive(Debug)]
pub struct ControllerHandle {
    synced: watch::Receiver<bool>,
    stats: Arc<ControllerStats>,
    task: JoinHandle<()>,
}

impl ControllerHandle {
    /// Turns `true` once the first selection (from complete lists) was published.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    pub fn stats(&self) -> Arc<ControllerStats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the controller without writer feedback (configuration conditions only).
pub fn spawn(
    client: Client,
    config: ControllerConfig,
    selection: watch::Sender<Arc<Selection>>,
) -> ControllerHandle {
    let (_unused, writer) = watch::channel(WriterView::default());
    spawn_with_writer(client, config, selection, writer)
}

/// Starts the controller. It publishes on `selection`, and writes status with `client` from the
/// resolution and from `writer` (what the writer reported in this leader term); every change
/// of `writer` re-evaluates the conditions.
pub fn spawn_with_writer(
    client: Client,
    config: ControllerConfig,
    selection: watch::Sender<Arc<Selection>>,
    writer: watch::Receiver<WriterView>,
) -> ControllerHandle {
    let (synced_tx, synced) = watch::channel(false);
    let stats = config.stats.clone().unwrap_or_default();
    let task = tokio::spawn(run(
        client,
        config,
        selection,
        writer,
        synced_tx,
        Arc::clone(&stats),
    ));
    ControllerHandle {
        synced,
        stats,
        task,
    }
}

/// Which store an event came from, and whether its (re)list just completed.
type Tick = (usize, bool);

fn reflect<K>(api: Api<K>, index: usize) -> (Store<K>, BoxStream<'static, Tick>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .map_ok(move |event| (index, matches!(event, watcher::Event::InitDone)))
        // The backoff retries; the error is only worth a log line (and a tick: a store may
        // have changed before the error).
        .map(move |item| {
            item.unwrap_or_else(|error| {
                warn!(%error, store = STORE_NAMES[index], "watch failed; retrying");
                (index, false)
            })
        })
        .boxed();
    (reader, stream)
}

const STORE_NAMES: [&str; 5] = [
    "gitrepoconfigs",
    "gitdestinations",
    "watchrules",
    "clusterwatchrules",
    "namespaces",
];

struct Stores {
    repos: Store<GitRepoConfig>,
    destinations: Store<GitDestination>,
    watch_rules: Store<WatchRule>,
    cluster_watch_rules: Store<ClusterWatchRule>,
    namespaces: Store<Namespace>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        fn owned<K: Clone>(items: Vec<Arc<K>>) -> Vec<K> {
            items.into_iter().map(|k| (*k).clone()).collect()
        }
        Snapshot {
            repos: owned(self.repos.state()),
            destinations: owned(self.destinations.state()),
            watch_rules: owned(self.watch_rules.state()),
            cluster_watch_rules: owned(self.cluster_watch_rules.state()),
            namespaces: self
                .namespaces
                .state()
                .iter()
                .map(|ns| (ns.name_any(), ns.labels().clone()))
                .collect(),
        }
    }
}

/// The listed objects, owned, so that resolving holds no store lock.
struct Snapshot {
    repos: Vec<GitRepoConfig>,
    destinations: Vec<GitDestination>,
    watch_rules: Vec<WatchRule>,
    cluster_watch_rules: Vec<ClusterWatchRule>,
    namespaces: NamespaceLabels,
}

impl Snapshot {
    fn resolve(
        &self,
        encryption: &BTreeMap<String, EncryptionLookup>,
        credentials: &BTreeMap<String, CredentialsLookup>,
    ) -> Resolution {
        resolve_with_lookups(
            Inputs {
                repos: &self.repos,
                destinations: &self.destinations,
                watch_rules: &self.watch_rules,
                cluster_watch_rules: &self.cluster_watch_rules,
                namespaces: &self.namespaces,
            },
            encryption,
            credentials,
        )
    }
}

async fn run(
    client: Client,
    config: ControllerConfig,
    selection: watch::Sender<Arc<Selection>>,
    mut writer_view: watch::Receiver<WriterView>,
    synced: watch::Sender<bool>,
    stats: Arc<ControllerStats>,
) {
    let (repos, s0) = reflect(Api::<GitRepoConfig>::all(client.clone()), 0);
    let (destinations, s1) = reflect(Api::<GitDestination>::all(client.clone()), 1);
    let (watch_rules, s2) = reflect(Api::<WatchRule>::all(client.clone()), 2);
    let (cluster_watch_rules, s3) = reflect(Api::<ClusterWatchRule>::all(client.clone()), 3);
    let (namespaces, s4) = reflect(Api::<Namespace>::all(client.clone()), 4);
    let stores = Stores {
        repos,
        destinations,
        watch_rules,
        cluster_watch_rules,
        namespaces,
    };
    let mut ticks: SelectAll<BoxStream<'static, Tick>> =
        futures::stream::select_all([s0, s1, s2, s3, s4]);
    let mut listed = [false; 5];
    let writer = StatusWriter {
        client,
        stats: Arc::clone(&stats),
        events: config.events.clone(),
    };

    // Without a sender the last view stays in force.
    let mut writer_open = true;
    let mut keys = encryption::KeyCache::default();
    let mut refresh = tokio::time::interval(config.encryption_refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            tick = ticks.next() => match tick {
                Some((index, done)) => listed[index] |= done,
                None => return,
            },
            // Recipients Secrets are not watched (the agent does not hold every Secret in memory):
            // re-read them now and then, so a changed or deleted one takes effect.
            _ = refresh.tick() => {}
            changed = writer_view.changed(), if writer_open => {
                writer_open = changed.is_ok();
                if !writer_open {
                    continue;
                }
            }
        }
        // Coalesce a burst into one resolution.
        let pause = tokio::time::sleep(config.debounce);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                tick = ticks.next() => match tick {
                    Some((index, done)) => listed[index] |= done,
                    None => return,
                },
                changed = writer_view.changed(), if writer_open => writer_open = changed.is_ok(),
            }
        }
        if !listed.iter().all(|l| *l) {
            debug!(
                ?listed,
                "waiting for every custom resource list before resolving"
            );
            continue;
        }
        let snapshot = stores.snapshot();
        let lookups = encryption::lookup_all(
            &writer.client,
            &config.namespace,
            &snapshot.destinations,
            &mut keys,
        )
        .await;
        let credentials =
            repo_credentials::lookup_all(&writer.client, &snapshot.repos, config.writer_tls).await;
        let resolution = snapshot.resolve(&lookups, &credentials);
        stats
            .resolutions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let published = selection.send_if_modified(|current| {
            if **current == resolution.selection {
                false
            } else {
                *current = Arc::new(resolution.selection.clone());
                true
            }
        });
        if published {
            info!(
                destinations = resolution.selection.destinations.len(),
                rules = resolution.selection.rules.len(),
                "selection changed"
            );
        }
        synced.send_replace(true);
        let view = writer_view.borrow_and_update().clone();
        writer.write_all(&snapshot, &resolution, &view).await;
    }
}

/// Reads the Secrets GitRepoConfigs name in `spec.secretRef` (by name, in the GitRepoConfig's namespace).
mod repo_credentials {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Secret;
    use kube::{Api, Client, ResourceExt};
    use tracing::warn;

    use reverser_common::reasons::AgentConditionReason as Reason;

    use crate::config::resolve::CredentialsLookup;
    use crate::crd::GitRepoConfig;
    use crate::credentials::from_secret_data;

    pub(super) async fn lookup_all(
        client: &Client,
        repos: &[GitRepoConfig],
        writer_tls: bool,
    ) -> BTreeMap<String, CredentialsLookup> {
        let mut out = BTreeMap::new();
        for repo in repos {
            let Some(reference) = &repo.spec.secret_ref else {
                continue;
            };
            let ns = repo.namespace().unwrap_or_default();
            let repo_key = format!("{ns}/{}", repo.name_any());
            let name = &reference.name;
            let failed = |reason, message: String| CredentialsLookup::Failed { reason, message };
            let lookup = if !writer_tls {
                failed(
                    Reason::CredentialsNeedTls,
                    format!(
                        "credentials from Secret {ns}/{name} are not sent: the agent reaches the writer without TLS \
                         (set --writer-ca)"
                    ),
                )
            } else {
                let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
                match api.get_opt(name).await {
                    Err(e) => failed(
                        Reason::CredentialsSecretNotFound,
                        format!("reading Secret {ns}/{name} failed: {e}"),
                    ),
                    Ok(None) => failed(
                        Reason::CredentialsSecretNotFound,
                        format!("Secret {ns}/{name} does not exist"),
                    ),
                    Ok(Some(secret)) => match from_secret_data(&secret.data.unwrap_or_default()) {
                        Ok(credentials) => CredentialsLookup::Ready(credentials),
                        Err(e) => failed(
                            Reason::InvalidCredentialsSecret,
                            format!("Secret {ns}/{name}: {e}"),
                        ),
                    },
                }
            };
            if let CredentialsLookup::Failed { reason, message } = &lookup {
                warn!(repo = %repo_key, reason = reason.as_str(), %message, "repository credentials are not usable; its destinations are not declared");
            }
            out.insert(repo_key, lookup);
        }
        out
    }
}

/// Looks up what encrypting destinations need: their recipients and fingerprint keys.
mod encryption {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ObjectMeta, PostParams};
    use kube::{Client, ResourceExt};
    use sha2::{Digest, Sha256};
    use tracing::warn;

    use reverser_common::reasons::AgentConditionReason as Reason;

    use crate::config::resolve::EncryptionLookup;
    use crate::crd::GitDestination;
    use crate::sops::{self, Encryption, FingerprintKey};

    /// Key of the fingerprint key inside its Secret.
    const KEY: &str = "key";

    /// Fingerprint keys already read or created, per destination key.
    #[derive(Default)]
    pub(super) struct KeyCache(BTreeMap<String, FingerprintKey>);

    /// `gitops-reverser-fingerprint-{namespace}.{name}`, or a hash of the key when that is too long for
    /// a Secret name.
    pub fn fingerprint_secret_name(destination_key: &str) -> String {
        let readable = format!(
            "gitops-reverser-fingerprint-{}",
            destination_key.replace('/', ".")
        );
        if readable.len() <= 253 {
            readable
        } else {
            let digest = hex::encode(Sha256::digest(destination_key.as_bytes()));
            format!("gitops-reverser-fingerprint-{}", &digest[..32])
        }
    }

    pub(super) async fn lookup_all(
        client: &Client,
        namespace: &str,
        destinations: &[GitDestination],
        keys: &mut KeyCache,
    ) -> BTreeMap<String, EncryptionLookup> {
        let mut out = BTreeMap::new();
        for dest in destinations {
            let Some(spec) = &dest.spec.encryption else {
                continue;
            };
            let ns = dest.namespace().unwrap_or_default();
            let dest_key = format!("{ns}/{}", dest.name_any());
            let lookup = match recipients(client, &ns, &spec.age).await {
                Err((reason, message)) => EncryptionLookup::Failed { reason, message },
                Ok(recipients) => match fingerprint_key(client, namespace, &dest_key, keys).await {
                    Ok(fingerprint_key) => EncryptionLookup::Ready(Encryption {
                        recipients,
                        fingerprint_key,
                    }),
                    Err(message) => EncryptionLookup::Failed {
                        reason: Reason::FingerprintKeyUnavailable,
                        message,
                    },
                },
            };
            if let EncryptionLookup::Failed { reason, message } = &lookup {
                warn!(destination = %dest_key, %reason, %message, "encryption of the destination is not usable; its Secrets are not sent");
            }
            out.insert(dest_key, lookup);
        }
        out
    }

    async fn recipients(
        client: &Client,
        ns: &str,
        age: &crate::crd::AgeEncryption,
    ) -> Result<Vec<String>, (Reason, String)> {
        let mut entries: Vec<String> = age.recipients.clone();
        if let Some(reference) = &age.recipients_secret_ref {
            let api: Api<Secret> = Api::namespaced(client.clone(), ns);
            let unreadable = |message: String| (Reason::RecipientsSecretUnreadable, message);
            let secret = api
                .get_opt(&reference.name)
                .await
                .map_err(|e| {
                    unreadable(format!(
                        "reading Secret {ns}/{} failed: {e}",
                        reference.name
                    ))
                })?
                .ok_or_else(|| {
                    (
                        Reason::RecipientsSecretNotFound,
                        format!(
                            "the recipients Secret {ns}/{} does not exist",
                            reference.name
                        ),
                    )
                })?;
            let data = secret.data.unwrap_or_default();
            let values: Vec<&ByteString> = match &reference.key {
                Some(key) => vec![data.get(key).ok_or_else(|| {
                    unreadable(format!(
                        "the recipients Secret {ns}/{} has no key {key:?}",
                        reference.name
                    ))
                })?],
                None => data.values().collect(),
            };
            for value in values {
                entries.push(String::from_utf8(value.0.clone()).map_err(|_| {
                    unreadable(format!(
                        "the recipients Secret {ns}/{} is not UTF-8 text",
                        reference.name
                    ))
                })?);
            }
        }
        sops::parse_recipients(entries.iter().map(String::as_str))
            .map_err(|e| (Reason::InvalidRecipients, e.to_string()))
    }

    /// The destination's fingerprint key: cached, else read from its Secret, else created (a race with
    /// another leader creating it is resolved by reading theirs).
    async fn fingerprint_key(
        client: &Client,
        namespace: &str,
        dest_key: &str,
        keys: &mut KeyCache,
    ) -> Result<FingerprintKey, String> {
        if let Some(key) = keys.0.get(dest_key) {
            return Ok(key.clone());
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let name = fingerprint_secret_name(dest_key);
        let read = |secret: Secret| {
            secret
                .data
                .and_then(|d| d.get(KEY).and_then(|v| FingerprintKey::from_slice(&v.0)))
                .ok_or_else(|| format!("Secret {namespace}/{name} holds no 32-byte {KEY:?}"))
        };
        let key = match api.get_opt(&name).await {
            Err(e) => return Err(format!("reading Secret {namespace}/{name} failed: {e}")),
            Ok(Some(secret)) => read(secret)?,
            Ok(None) => {
                let key = FingerprintKey::generate();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(
                            [(
                                "app.kubernetes.io/managed-by".to_owned(),
                                "gitops-reverser".to_owned(),
                            )]
                            .into(),
                        ),
                        annotations: Some(
                            [(
                                "configbutler.ai/destination".to_owned(),
                                dest_key.to_owned(),
                            )]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    data: Some([(KEY.to_owned(), ByteString(key.as_bytes().to_vec()))].into()),
                    type_: Some("Opaque".into()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => key,
                    Err(kube::Error::Api(status)) if status.code == 409 => match api
                        .get(&name)
                        .await
                    {
                        Ok(secret) => read(secret)?,
                        Err(e) => {
                            return Err(format!("reading Secret {namespace}/{name} failed: {e}"));
                        }
                    },
                    Err(e) => {
                        return Err(format!("creating Secret {namespace}/{name} failed: {e}"));
                    }
                }
            }
        };
        keys.0.insert(dest_key.to_owned(), key.clone());
        Ok(key)
    }
}

/// Writes the conditions to `/status`.
struct StatusWriter {
    client: Client,
    stats: Arc<ControllerStats>,
    events: Option<EventSink>,
}

impl StatusWriter {
    async fn write_all(&self, snapshot: &Snapshot, resolution: &Resolution, view: &WriterView) {
        let mut readiness: std::collections::BTreeMap<String, DestinationReadiness> =
            Default::default();
        for dest in &snapshot.destinations {
            let ns = dest.namespace().unwrap_or_default();
            let key = format!("{ns}/{}", dest.name_any());
            let Some(config) = resolution.destination_conditions.get(&key) else {
                continue;
            };
            let declared = resolution.selection.destination(&key).is_some();
            let (mut desired, ready) = conditions::destination_conditions(
                config,
                declared,
                dest.spec.exclusive_mode,
                dest.status.as_ref(),
                view,
                &key,
            );
            // The selection carrying the request was published before the statuses are written.
            desired.handled_reconcile = resolution.selection.reconcile_requests.get(&key).cloned();
            desired.set.extend(conditions::suspended_condition(
                dest.spec.suspend,
                dest.status.as_ref(),
            ));
            desired.clear_suspend_preview = !dest.spec.suspend;
            readiness.insert(key, ready);
            let api = Api::<GitDestination>::namespaced(self.client.clone(), &ns);
            self.write(&api, dest, dest.status.as_ref(), &desired).await;
        }
        for rule in &snapshot.watch_rules {
            let ns = rule.namespace().unwrap_or_default();
            let id = format!("WatchRule/{ns}/{}", rule.name_any());
            let dest_ref = &rule.spec.destination_ref;
            let dest_key = format!(
                "{}/{}",
                dest_ref.namespace.as_deref().unwrap_or(&ns),
                dest_ref.name
            );
            if let Some(config) = resolution.rule_conditions.get(&id) {
                let desired = conditions::rule_conditions(
                    config,
                    &dest_key,
                    readiness.get(&dest_key),
                    resolution
                        .secrets_skipped
                        .get(&id)
                        .map(|(reason, message)| {
                            conditions::secrets_skipped_because(*reason, message)
                        }),
                );
                let api = Api::<WatchRule>::namespaced(self.client.clone(), &ns);
                self.write(&api, rule, rule.status.as_ref(), &desired).await;
            }
        }
        for rule in &snapshot.cluster_watch_rules {
            let id = format!("ClusterWatchRule/{}", rule.name_any());
            let dest_ref = &rule.spec.destination_ref;
            let dest_key = format!("{}/{}", dest_ref.namespace, dest_ref.name);
            if let Some(config) = resolution.rule_conditions.get(&id) {
                let desired = conditions::rule_conditions(
                    config,
                    &dest_key,
                    readiness.get(&dest_key),
                    resolution
                        .secrets_skipped
                        .get(&id)
                        .map(|(reason, message)| {
                            conditions::secrets_skipped_because(*reason, message)
                        }),
                );
                let api = Api::<ClusterWatchRule>::all(self.client.clone());
                self.write(&api, rule, rule.status.as_ref(), &desired).await;
            }
        }
    }

    async fn write<K>(
        &self,
        api: &Api<K>,
        object: &K,
        current: Option<&ResourceStatus>,
        desired: &DesiredConditions,
    ) where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let generation = object.meta().generation;
        let Some(status) = conditions::next_status(current, desired, generation, Timestamp::now())
        else {
            return;
        };
        let name = object.name_any();
        let events = kube_events::condition_events(
            current.map(|s| s.conditions.as_slice()).unwrap_or(&[]),
            &status.conditions,
        );
        let mut patch = serde_json::json!({ "status": status });
        if desired.clear_suspend_preview && current.is_some_and(|s| s.suspend_preview.is_some()) {
            patch["status"]["suspendPreview"] = serde_json::Value::Null;
        }
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.stats
                    .status_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(sink) = &self.events {
                    sink.emit(&object.object_ref(&()), events);
                }
                let ready = desired.set.iter().find(|c| c.type_ == READY);
                let secrets_skipped = desired
                    .set
                    .iter()
                    .any(|c| c.type_ == conditions::SECRETS_SKIPPED);
                info!(
                    kind = %K::kind(&()),
                    namespace = object.namespace().unwrap_or_default(),
                    %name,
                    ready = ready.map(|c| c.status),
                    reason = ready.map(|c| c.reason.as_str()),
                    conditions = ?desired.set.iter().map(|c| format!("{}={}", c.type_, c.status)).collect::<Vec<_>>(),
                    "status updated"
                );
                if secrets_skipped {
                    info!(
                        kind = %K::kind(&()),
                        namespace = object.namespace().unwrap_or_default(),
                        %name,
                        "the rule selects Secrets; they are skipped until encrypted output is configured"
                    );
                }
            }
            // The object may have been deleted meanwhile; the next event retries anything else.
            Err(error) => {
                self.stats
                    .status_write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(kind = %K::kind(&()), %name, %error, "status update failed");
            }
        }
    }
}

/// The status to write so that its `Ready` says `condition` for `generation`, or `None` when it
/// already does. Other condition types are kept; `lastTransitionTime` only moves when the status
/// flips. (The controller writes more conditions at once with [`conditions::next_status`].)
pub fn next_status(
    current: Option<&ResourceStatus>,
    condition: &ReadyCondition,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<ResourceStatus> {
    let desired = DesiredConditions {
        set: vec![DesiredCondition::new(
            READY,
            condition.ready,
            condition.reason.as_str(),
            condition.message.clone(),
        )],
        ..Default::default()
    };
    conditions::next_status(current, &desired, generation, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use reverser_common::reasons::AgentConditionReason as Reason;

    fn cond(ready: bool, reason: Reason, message: &str) -> ReadyCondition {
        ReadyCondition {
            ready,
            reason,
            message: message.to_owned(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn writes_a_ready_condition_when_there_is_no_status_yet() {
        let status = next_status(None, &cond(true, Reason::Ready, "ok"), Some(3), at(10)).unwrap();
        assert_eq!(status.observed_generation, Some(3));
        let c = &status.conditions[0];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            ("Ready", "True", "Ready")
        );
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, Time(at(10)));
    }

    #[test]
    fn writes_nothing_when_the_condition_is_already_there() {
        let first = next_status(
            None,
            &cond(false, Reason::RepoNotFound, "gone"),
            Some(1),
            at(1),
        );
        let again = next_status(
            first.as_ref(),
            &cond(false, Reason::RepoNotFound, "gone"),
            Some(1),
            at(2),
        );
        assert_eq!(again, None);
    }

    #[test]
    fn a_new_generation_is_written_but_keeps_the_transition_time() {
        let first = next_status(None, &cond(true, Reason::Ready, "ok"), Some(1), at(1)).unwrap();
        let next = next_status(
            Some(&first),
            &cond(true, Reason::Ready, "ok"),
            Some(2),
            at(5),
        )
        .expect("generation moved");
        assert_eq!(next.conditions[0].last_transition_time, Time(at(1)));
        assert_eq!(next.observed_generation, Some(2));
    }

    #[test]
    fn flipping_to_false_moves_the_transition_time_and_keeps_other_conditions() {
        let mut first =
            next_status(None, &cond(true, Reason::Ready, "ok"), Some(1), at(1)).unwrap();
        first.conditions.push(Condition {
            type_: "PushFailing".into(),
            status: "False".into(),
            reason: "Ok".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(at(0)),
        });
        let next = next_status(
            Some(&first),
            &cond(false, Reason::AccessDenied, "denied"),
            Some(1),
            at(7),
        )
        .unwrap();
        assert_eq!(next.conditions.len(), 2);
        assert_eq!(next.conditions[0].status, "False");
        assert_eq!(next.conditions[0].reason, "AccessDenied");
        assert_eq!(next.conditions[0].last_transition_time, Time(at(7)));
        assert_eq!(next.conditions[1].type_, "PushFailing");
    }
}
