//! The `ValidatingWebhookConfiguration` that sends the watched types' writes to the webhook.
//! Pure: the leader applies what [`validating_webhook_configuration`] builds (server-side
//! apply) whenever the set of watched types changes.
//!
//! Choices, each for attribution's sake:
//! - `rules`: exactly the watched group/version/resources, CREATE/UPDATE/DELETE, no
//!   subresources but `/scale` of the built-in workloads (deployments, statefulsets,
//!   replicasets, replicationcontrollers), whose Scale names the parent's replicas. With `matchPolicy: Equivalent` the API server converts the object to the
//!   *watched* version before calling, so the admitted object hashes like the watch event.
//! - `failurePolicy: Ignore` and a short timeout: attribution must never block the cluster,
//!   even while the agent is down or changing leaders.
//! - `sideEffects: None`: the webhook changes nothing outside the agent's memory (a fact is not
//!   a side effect on the cluster), and the handler records nothing for dry runs anyway.
//! - `namespaceSelector`: never the agent's own namespace (nor `exclude_namespaces`), so the
//!   agent's own writes (Lease, Pod label, events) never wait for its webhook.
//! - Sensitive types (core Secrets and `--sensitive-resources`) are never listed: they are mirrored only
//!   encrypted, never attributed, and their plaintext is never hashed.
//! - A second webhook ([`COMMIT_REQUESTS_WEBHOOK`]) sends only CommitRequest CREATEs, from every namespace (the
//!   agent's own too: GitDestinations often live there, and the agent never creates CommitRequests): their creator
//!   authors the requested commit.
//!
//! The chart's template (`charts/gitops-reverser/templates/validating-webhook.yaml`) uses the
//! same values, with broad rules instead of the watched types.
//!
//! Lifecycle (the chart passes these; see the chart README "Webhook"):
//! - `labels`/`annotations` (`--webhook-configuration-label`/`-annotation`): Helm's ownership
//!   metadata, so a later `helm upgrade` that makes the chart own the configuration again adopts
//!   it instead of refusing to import it.
//! - `owner_cluster_role` (`--webhook-configuration-owner`): an ownerReference to that
//!   ClusterRole (cluster-scoped, as the owner of a cluster-scoped object must be), so the
//!   garbage collector deletes the configuration with the release. While the ClusterRole does
//!   not exist (an uninstall under way) nothing is applied, so the agent never re-creates what
//!   the collector just removed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, OwnerReference,
};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams};

use super::handler::PATH;
use crate::rules::ResourceKey;
use crate::rules::is_sensitive_resource;

/// The name of the webhook that attributes CommitRequests.
pub const COMMIT_REQUESTS_WEBHOOK: &str = "commitrequests.gitops-reverser.configbutler.ai";

/// Where the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `https://host:port` (the path is appended).
    Url(String),
    /// The leader-only Service (selecting `configbutler.ai/leader=true`).
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
}

/// Everything but the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// `metadata.name` of the configuration.
    pub name: String,
    /// The webhook's name (a DNS name with at least three labels).
    pub webhook_name: String,
    pub target: Target,
    /// PEM of the CA that signed the webhook's certificate.
    pub ca_bundle_pem: Vec<u8>,
    /// 1..=30 seconds.
    pub timeout_seconds: i32,
    /// Namespaces never sent to the webhook (the agent's own, at least).
    pub exclude_namespaces: Vec<String>,
    /// `--sensitive-resources` (`plural` or `plural.group`): never listed, even when watched. Core `secrets`
    /// never are, whatever this holds.
    pub sensitive_resources: Vec<String>,
    /// Set on the configuration besides `app.kubernetes.io/managed-by: gitops-reverser` (which
    /// a label here may replace).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// ClusterRole that owns the configuration (garbage collection); nothing is applied while
    /// it is missing.
    pub owner_cluster_role: Option<String>,
}

impl Registration {
    pub fn new(name: &str, target: Target, ca_bundle_pem: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            webhook_name: "attribution.gitops-reverser.configbutler.ai".to_owned(),
            target,
            ca_bundle_pem,
            // As the chart's default `agent.webhook.timeoutSeconds`.
            timeout_seconds: 3,
            exclude_namespaces: Vec::new(),
            sensitive_resources: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            owner_cluster_role: None,
        }
    }
}

/// The ownerReference to a ClusterRole (not blocking its deletion: that needs more RBAC and the
/// configuration is worthless without its owner anyway).
pub fn owner_reference(role: &ClusterRole) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "rbac.authorization.k8s.io/v1".to_owned(),
        kind: "ClusterRole".to_owned(),
        name: role.metadata.name.clone()?,
        uid: role.metadata.uid.clone()?,
        block_owner_deletion: None,
        controller: None,
    })
}

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// The owner ClusterRole does not exist: nothing applied.
    OwnerMissing,
}

/// Server-side applies the configuration for `resources` as `field_manager`, owned by the
/// registration's ClusterRole when it has one (and not at all while that is missing).
pub async fn apply<'a>(
    client: &kube::Client,
    registration: &Registration,
    resources: impl IntoIterator<Item = &'a ResourceKey>,
    field_manager: &str,
) -> Result<Applied, kube::Error> {
    let owner = match &registration.owner_cluster_role {
        None => None,
        Some(name) => {
            let roles: Api<ClusterRole> = Api::all(client.clone());
            match roles.get_opt(name).await? {
                None => return Ok(Applied::OwnerMissing),
                Some(role) => owner_reference(&role),
            }
        }
    };
    let mut configuration = validating_webhook_configuration(registration, resources);
    configuration.metadata.owner_references = owner.map(|o| vec![o]);
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    api.patch(
        &registration.name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&configuration),
    )
    .await?;
    Ok(Applied::Applied)
}

/// Whether the configuration exists (someone may have deleted it: then it is applied again).
pub async fn exists(client: &kube::Client, name: &str) -> Result<bool, kube::Error> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    Ok(api.get_opt(name).await?.is_some())
}

/// The configuration for the watched `resources`. Rules are grouped per group/version and
/// sorted, so the same watches always produce the same object (no needless apply).
pub fn validating_webhook_configuration<'a>(
    registration: &Registration,
    resources: impl IntoIterator<Item = &'a ResourceKey>,
) -> ValidatingWebhookConfiguration {
    let mut grouped: BTreeMap<(&str, &str), BTreeSet<String>> = BTreeMap::new();
    for key in resources {
        if is_sensitive_resource(&registration.sensitive_resources, &key.group, &key.resource) {
            continue;
        }
        grouped
            .entry((key.group.as_str(), key.version.as_str()))
            .or_default()
            .insert(key.resource.clone());
        // `kubectl scale` and HPAs write the parent through `/scale` (see the handler).
        if super::handler::is_scaled_by_spec_replicas(&key.group, &key.resource) {
            grouped
                .entry((key.group.as_str(), key.version.as_str()))
                .or_default()
                .insert(format!("{}/scale", key.resource));
        }
    }
    let rules = grouped
        .into_iter()
        .map(|((group, version), plurals)| RuleWithOperations {
            api_groups: Some(vec![group.to_owned()]),
            api_versions: Some(vec![version.to_owned()]),
            operations: Some(["CREATE", "UPDATE", "DELETE"].map(str::to_owned).to_vec()),
            resources: Some(plurals.into_iter().collect()),
            scope: Some("*".to_owned()),
        })
        .collect();
    let client_config = match &registration.target {
        Target::Url(base) => WebhookClientConfig {
            url: Some(format!("{}{PATH}", base.trim_end_matches('/'))),
            ca_bundle: Some(ByteString(registration.ca_bundle_pem.clone())),
            service: None,
        },
        Target::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            url: None,
            ca_bundle: Some(ByteString(registration.ca_bundle_pem.clone())),
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(PATH.to_owned()),
                port: Some(i32::from(*port)),
            }),
        },
    };
    let mut excluded: Vec<String> = registration.exclude_namespaces.clone();
    excluded.sort();
    excluded.dedup();
    excluded.retain(|ns| !ns.is_empty());
    let namespace_selector = (!excluded.is_empty()).then(|| LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: "NotIn".to_owned(),
            values: Some(excluded),
        }]),
        match_labels: None,
    });
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(registration.name.clone()),
            labels: Some({
                let mut labels = BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "gitops-reverser".to_owned(),
                )]);
                labels.extend(registration.labels.clone());
                labels
            }),
            annotations: (!registration.annotations.is_empty())
                .then(|| registration.annotations.clone()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![
            ValidatingWebhook {
                name: registration.webhook_name.clone(),
                admission_review_versions: vec!["v1".to_owned()],
                client_config: client_config.clone(),
                failure_policy: Some("Ignore".to_owned()),
                match_policy: Some("Equivalent".to_owned()),
                side_effects: "None".to_owned(),
                timeout_seconds: Some(registration.timeout_seconds.clamp(1, 30)),
                namespace_selector,
                rules: Some(rules),
                ..ValidatingWebhook::default()
            },
            ValidatingWebhook {
                name: COMMIT_REQUESTS_WEBHOOK.to_owned(),
                admission_review_versions: vec!["v1".to_owned()],
                client_config,
                failure_policy: Some("Ignore".to_owned()),
                match_policy: Some("Equivalent".to_owned()),
                side_effects: "None".to_owned(),
                timeout_seconds: Some(registration.timeout_seconds.clamp(1, 30)),
                rules: Some(vec![RuleWithOperations {
                    api_groups: Some(vec![crate::crd::GROUP.to_owned()]),
                    api_versions: Some(vec![crate::crd::VERSION.to_owned()]),
                    operations: Some(vec!["CREATE".to_owned()]),
                    resources: Some(vec!["commitrequests".to_owned()]),
                    scope: Some("Namespaced".to_owned()),
                }]),
                ..ValidatingWebhook::default()
            },
        ]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_exactly_the_watched_types_grouped_by_version_without_sensitive_ones() {
        let watched = [
            ResourceKey::new("apps", "v1", "deployments", true),
            ResourceKey::new("", "v1", "configmaps", true),
            ResourceKey::new("", "v1", "secrets", true),
            ResourceKey::new("", "v1", "services", true),
            ResourceKey::new("apps", "v1", "deployments", true),
            // Watched because a destination encrypts them, but sensitive: never registered.
            ResourceKey::new("bitnami.com", "v1alpha1", "sealedsecrets", true),
            ResourceKey::new("vault.example.com", "v1", "credentials", true),
        ];
        let mut reg = Registration::new(
            "gitops-reverser-attribution",
            Target::Service {
                namespace: "gitops-reverser".into(),
                name: "gitops-reverser-webhook".into(),
                port: 443,
            },
            b"PEM".to_vec(),
        );
        reg.exclude_namespaces = vec!["gitops-reverser".into(), "kube-system".into()];
        reg.sensitive_resources = vec![
            "secrets".into(),
            "sealedsecrets.bitnami.com".into(),
            "credentials".into(),
        ];
        let vwc = serde_json::to_value(validating_webhook_configuration(&reg, &watched)).unwrap();
        let hook = &vwc["webhooks"][0];
        assert_eq!(
            hook["rules"],
            json!([
                {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE", "DELETE"],
                 "resources": ["configmaps", "services"], "scope": "*"},
                {"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE", "DELETE"],
                 "resources": ["deployments", "deployments/scale"], "scope": "*"}
            ])
        );
        assert_eq!(
            hook["clientConfig"],
            json!({"caBundle": "UEVN", "service": {"namespace": "gitops-reverser",
                   "name": "gitops-reverser-webhook", "path": PATH, "port": 443}})
        );
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["timeoutSeconds"], 3);
        assert_eq!(
            hook["namespaceSelector"],
            json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                   "values": ["gitops-reverser", "kube-system"]}]})
        );
        assert_eq!(hook["matchPolicy"], "Equivalent");
        assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    }

    #[test]
    fn sensitive_resources_decide_what_is_left_out() {
        let watched = [
            ResourceKey::new("", "v1", "configmaps", true),
            ResourceKey::new("", "v1", "secrets", true),
            ResourceKey::new("bitnami.com", "v1alpha1", "sealedsecrets", true),
        ];
        let resources = |sensitive: &[&str]| {
            let mut reg = Registration::new("x", Target::Url("https://h".into()), vec![]);
            reg.sensitive_resources = sensitive.iter().map(|s| (*s).to_owned()).collect();
            let vwc = validating_webhook_configuration(&reg, &watched);
            vwc.webhooks.unwrap()[0]
                .rules
                .clone()
                .unwrap()
                .into_iter()
                .flat_map(|r| r.resources.unwrap())
                .collect::<Vec<_>>()
        };
        // Core Secrets are always left out; other types only when marked sensitive.
        assert_eq!(resources(&[]), ["configmaps", "sealedsecrets"]);
        assert_eq!(resources(&["sealedsecrets.bitnami.com"]), ["configmaps"]);
        // `plural.group` names that group only; a bare `plural` any group.
        assert_eq!(
            resources(&["sealedsecrets.other.io"]),
            ["configmaps", "sealedsecrets"]
        );
        assert_eq!(
            resources(&["configmaps", "sealedsecrets"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn carries_the_ownership_metadata_it_is_given() {
        let mut reg = Registration::new("x", Target::Url("https://h".into()), vec![]);
        let plain = serde_json::to_value(validating_webhook_configuration(&reg, &[])).unwrap();
        assert_eq!(
            plain["metadata"],
            json!({"name": "x", "labels": {"app.kubernetes.io/managed-by": "gitops-reverser"}})
        );
        reg.labels = [("app.kubernetes.io/managed-by".into(), "Helm".into())].into();
        reg.annotations = [("meta.helm.sh/release-name".into(), "gr".into())].into();
        let helm = serde_json::to_value(validating_webhook_configuration(&reg, &[])).unwrap();
        assert_eq!(
            helm["metadata"],
            json!({"name": "x", "labels": {"app.kubernetes.io/managed-by": "Helm"},
                   "annotations": {"meta.helm.sh/release-name": "gr"}})
        );
    }

    #[test]
    fn appends_the_webhook_path_to_a_url_target() {
        let reg = Registration::new("x", Target::Url("https://127.0.0.1:8443/".into()), vec![]);
        let vwc = validating_webhook_configuration(&reg, &[]);
        let hook = &vwc.webhooks.unwrap()[0];
        assert!(hook.namespace_selector.is_none());
        assert_eq!(
            hook.client_config.url.as_deref(),
            Some("https://127.0.0.1:8443/process-validating-webhook")
        );
    }
}
