//! Which resource types and objects a rule selects.
//!
//! Matching follows Kubernetes admission-webhook rules, so that experienced
//! users get no surprises:
//!
//! - `apiGroups`: `""` is the core group, `*` all groups; empty means all.
//! - `apiVersions`: `*` all versions; empty means all.
//! - `resources`: exact plural names, `*` (all resources), `*/*` (all resources
//!   and subresources), `resource/subresource` and `resource/*`. The agent only
//!   mirrors main resources, so entries naming subresources (`pods/*`,
//!   `*/scale`) select nothing; `*/*` selects every main resource. As in the
//!   plan's examples, `plural.group` (`clusterroles.rbac.authorization.k8s.io`)
//!   pins the group too. There are no prefix wildcards (`deploy*` is a name).
//!   Empty `resources` means the [desired-state preset](DESIRED_STATE_PRESET).
//! - `operations`: `CREATE`, `UPDATE`, `DELETE`, `*`; empty means all.
//! - Label selectors have full `matchLabels` + `matchExpressions` semantics. An
//!   invalid selector selects nothing (fail closed) rather than everything.
//!
//! [`DEFAULT_EXCLUSIONS`] always apply, even to explicit entries and `*`: they
//! are runtime state or churn, never desired state. A `WatchRule` sees only
//! namespaced objects in its own namespace; a `ClusterWatchRule` rule selects
//! by scope, and for namespaced resources by the namespace's labels.
//!
//! Independently of rules, [`SelectionOptions::skip_reason`] skips objects the
//! cluster derives from others (controller-owned objects, `kube-root-ca.crt`).
//! Evaluate it on the raw object: sanitizing drops `ownerReferences`.
//!
//! [`compiled`] binds a rule to its destination and answers, per rule, which types, objects and snapshot scopes it
//! selects, from the primitives here.

pub mod compiled;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::Value;

use crate::crd::{
    ClusterResourceRule, ClusterWatchRuleSpec, OperationType, ResourceRule, ResourceScope,
    WatchRuleSpec,
};

/// A resource type as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    /// API group, `""` for core.
    pub group: String,
    pub version: String,
    /// Plural resource name, e.g. `deployments`.
    pub resource: String,
    pub namespaced: bool,
}

impl ResourceKey {
    pub fn new(group: &str, version: &str, resource: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            resource: resource.to_owned(),
            namespaced,
        }
    }

    fn is(&self, (group, resource): (&str, &str)) -> bool {
        self.group == group && self.resource == resource
    }
}

/// The change a watch event represents (`ADDED`, `MODIFIED`, `DELETED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

/// Desired-state preset v1.0 as `(group, plural)`: what an empty `resources`
/// list selects.
pub const DESIRED_STATE_PRESET: &[(&str, &str)] = &[
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("", "services"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "networkpolicies"),
    ("policy", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("", "configmaps"),
    ("", "secrets"),
    ("", "serviceaccounts"),
    ("", "resourcequotas"),
    ("", "limitranges"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("apiregistration.k8s.io", "apiservices"),
    ("storage.k8s.io", "storageclasses"),
];

/// Runtime and churn-heavy types as `(group, plural)`, never mirrored.
pub const DEFAULT_EXCLUSIONS: &[(&str, &str)] = &[
    ("", "pods"),
    ("", "events"),
    ("events.k8s.io", "events"),
    ("coordination.k8s.io", "leases"),
    ("", "endpoints"),
    ("discovery.k8s.io", "endpointslices"),
    ("apps", "controllerrevisions"),
    ("flowcontrol.apiserver.k8s.io", "flowschemas"),
    (
        "flowcontrol.apiserver.k8s.io",
        "prioritylevelconfigurations",
    ),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    // Requests to the agent itself, handled once: not desired state.
    ("configbutler.ai", "commitrequests"),
];

/// True for types in [`DEFAULT_EXCLUSIONS`].
pub fn is_default_excluded(key: &ResourceKey) -> bool {
    DEFAULT_EXCLUSIONS.iter().any(|&entry| key.is(entry))
}

/// True for types in [`DESIRED_STATE_PRESET`].
pub fn in_desired_state_preset(key: &ResourceKey) -> bool {
    DESIRED_STATE_PRESET.iter().any(|&entry| key.is(entry))
}

/// The type-selecting fields (operations aside) shared by `ResourceRule` and `ClusterResourceRule`.
#[derive(Debug, Clone, Copy)]
struct TypeFields<'a> {
    api_groups: &'a [String],
    api_versions: &'a [String],
    resources: &'a [String],
}

impl<'a> From<&'a ResourceRule> for TypeFields<'a> {
    fn from(r: &'a ResourceRule) -> Self {
        Self {
            api_groups: &r.api_groups,
            api_versions: &r.api_versions,
            resources: &r.resources,
        }
    }
}

impl<'a> From<&'a ClusterResourceRule> for TypeFields<'a> {
    fn from(r: &'a ClusterResourceRule) -> Self {
        Self {
            api_groups: &r.api_groups,
            api_versions: &r.api_versions,
            resources: &r.resources,
        }
    }
}

impl TypeFields<'_> {
    fn selects_type(&self, key: &ResourceKey) -> bool {
        if is_default_excluded(key) {
            return false;
        }
        let group_ok = self.api_groups.is_empty()
            || self.api_groups.iter().any(|g| g == "*" || *g == key.group);
        let version_ok = self.api_versions.is_empty()
            || self
                .api_versions
                .iter()
                .any(|v| v == "*" || *v == key.version);
        let resource_ok = if self.resources.is_empty() {
            in_desired_state_preset(key)
        } else {
            self.resources
                .iter()
                .any(|entry| resource_entry_matches(entry, key))
        };
        group_ok && version_ok && resource_ok
    }
}

/// Matches one `resources` entry against a main resource.
fn resource_entry_matches(entry: &str, key: &ResourceKey) -> bool {
    let name = match entry.split_once('/') {
        // Only `*/*` includes main resources; every other subresource form
        // names subresources, which the agent does not mirror.
        Some(("*", "*")) => return true,
        Some(_) => return false,
        None => entry,
    };
    match name.split_once('.') {
        Some((resource, group)) => {
            (resource == "*" || resource == key.resource) && group == key.group
        }
        None => name == "*" || name == key.resource,
    }
}

/// Empty `operations` and `*` select every operation.
pub fn operation_matches(operations: &[OperationType], op: Operation) -> bool {
    operations.is_empty()
        || operations.iter().any(|o| {
            matches!(
                (o, op),
                (OperationType::All, _)
                    | (OperationType::Create, Operation::Create)
                    | (OperationType::Update, Operation::Update)
                    | (OperationType::Delete, Operation::Delete)
            )
        })
}

/// Whether a `WatchRule` rule selects a type (only namespaced types qualify).
pub fn resource_rule_selects(rule: &ResourceRule, key: &ResourceKey) -> bool {
    key.namespaced && TypeFields::from(rule).selects_type(key)
}

/// Whether a `ClusterWatchRule` rule selects a type, honouring its scope.
pub fn cluster_resource_rule_selects(rule: &ClusterResourceRule, key: &ResourceKey) -> bool {
    let scope_ok = match rule.scope {
        ResourceScope::Cluster => !key.namespaced,
        ResourceScope::Namespaced => key.namespaced,
    };
    scope_ok && TypeFields::from(rule).selects_type(key)
}

/// What rule matching needs to know about one object.
#[derive(Debug, Clone, Copy)]
pub struct ObjectFacts<'a> {
    /// `None` (or empty) for cluster-scoped objects.
    pub namespace: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
}

/// `metadata.labels` of a raw object (non-string values are ignored).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a `WatchRule` in `rule_namespace` selects this object and change.
pub fn watch_rule_matches(
    rule_namespace: &str,
    spec: &WatchRuleSpec,
    key: &ResourceKey,
    op: Operation,
    obj: ObjectFacts<'_>,
) -> bool {
    // A WatchRule never reaches outside its own namespace.
    if !key.namespaced || obj.namespace != Some(rule_namespace) {
        return false;
    }
    if !object_selector_admits(spec.object_selector.as_ref(), obj.labels) {
        return false;
    }
    spec.rules
        .iter()
        .any(|rule| resource_rule_selects(rule, key) && operation_matches(&rule.operations, op))
}

/// Whether a rule's `objectSelector` (none: every object) admits an object with these labels; an invalid
/// selector admits nothing.
pub fn object_selector_admits(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|selector| label_selector_matches(selector, labels).unwrap_or(false))
}

/// Whether a `ClusterWatchRule` selects a change to an object of type `key`.
///
/// `namespace_labels` are the labels of the object's namespace (`None` for
/// cluster-scoped objects). When a namespaced object's namespace labels are
/// unknown (`None`), rules with a `namespaceSelector` do not match, so that a
/// namespace is never mirrored before it is known to be selected.
pub fn cluster_watch_rule_matches(
    spec: &ClusterWatchRuleSpec,
    key: &ResourceKey,
    op: Operation,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    spec.rules.iter().any(|rule| {
        if !cluster_resource_rule_selects(rule, key) || !operation_matches(&rule.operations, op) {
            return false;
        }
        match (&rule.namespace_selector, rule.scope) {
            (Some(selector), ResourceScope::Namespaced) => namespace_labels
                .is_some_and(|labels| label_selector_matches(selector, labels).unwrap_or(false)),
            _ => true,
        }
    })
}

/// Whether an object name matches an `excludeNames` pattern: `*` any run of characters (also none),
/// `?` exactly one, anything else itself. Linear backtracking over the last `*` only, so no pattern
/// can make matching blow up.
pub fn name_pattern_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // (pattern index of the last `*`, name index it currently stands for up to).
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((star_p, star_n)) = star {
            // Let the last `*` swallow one more character and retry after it.
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Why an `excludeNames` pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamePatternError {
    #[error("excludeNames holds an empty pattern")]
    Empty,
    #[error("excludeNames pattern {0:?} is longer than 253 characters")]
    TooLong(String),
}

/// Checks the `excludeNames` patterns of a rule.
pub fn validate_name_patterns(patterns: &[String]) -> Result<(), NamePatternError> {
    for pattern in patterns {
        if pattern.trim().is_empty() {
            return Err(NamePatternError::Empty);
        }
        if pattern.chars().count() > 253 {
            return Err(NamePatternError::TooLong(
                pattern.chars().take(40).collect::<String>() + "…",
            ));
        }
    }
    Ok(())
}

/// Why a label selector is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown label selector operator {0:?}")]
    UnknownOperator(String),
    #[error("operator {operator} on key {key:?} needs at least one value")]
    ValuesRequired { key: String, operator: String },
    #[error("operator {operator} on key {key:?} takes no values")]
    ValuesForbidden { key: String, operator: String },
}

/// Evaluates a label selector: all `matchLabels` and all `matchExpressions`
/// must hold; an empty selector matches everything.
pub fn label_selector_matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, SelectorError> {
    let mut matched = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    // Validate every expression even after a mismatch, so an invalid selector
    // is reported regardless of the labels it happens to be evaluated on.
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        let value = labels.get(&expr.key);
        let holds = match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(SelectorError::ValuesRequired {
                    key: expr.key.clone(),
                    operator: expr.operator.clone(),
                });
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(SelectorError::ValuesForbidden {
                    key: expr.key.clone(),
                    operator: expr.operator.clone(),
                });
            }
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(SelectorError::UnknownOperator(other.to_owned())),
        };
        matched &= holds;
    }
    Ok(matched)
}

/// Why an object is derived from others or generated by the cluster, if it is:
/// `"controller-owned"` (an ownerReference with `controller: true`, e.g. a
/// ReplicaSet's Pods or an operator's Secrets), `"automanaged-apiservice"` (an
/// APIService the API server registers itself) or `"kube-root-ca.crt"` (the CA
/// ConfigMap the control plane publishes into every namespace).
pub fn is_derived_or_generated(obj: &Value) -> Option<&'static str> {
    let controller_owned = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        });
    if controller_owned {
        return Some(REASON_CONTROLLER_OWNED);
    }
    if is_fingerprint_key(obj) {
        return Some(REASON_FINGERPRINT_KEY);
    }
    if is_automanaged_api_service(obj) {
        return Some(REASON_AUTOMANAGED_API_SERVICE);
    }
    let is_root_ca = obj.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && obj.get("kind").and_then(Value::as_str) == Some("ConfigMap")
        && obj.pointer("/metadata/name").and_then(Value::as_str) == Some("kube-root-ca.crt");
    is_root_ca.then_some(REASON_KUBE_ROOT_CA)
}

const REASON_CONTROLLER_OWNED: &str = "controller-owned";
const REASON_AUTOMANAGED_API_SERVICE: &str = "automanaged-apiservice";

/// The APIServices the API server registers itself for every built-in group/version and every CRD's
/// (`kube-aggregator.kubernetes.io/automanaged`): they come and go with the CRDs and the server version, nobody
/// applies them. APIServices of extension API servers (metrics-server …) carry no such label and stay.
fn is_automanaged_api_service(obj: &Value) -> bool {
    obj.get("apiVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| v.starts_with("apiregistration.k8s.io/"))
        && obj.get("kind").and_then(Value::as_str) == Some("APIService")
        && obj
            .pointer("/metadata/labels/kube-aggregator.kubernetes.io~1automanaged")
            .is_some()
}
const REASON_FINGERPRINT_KEY: &str = "fingerprint-key";

/// The agent's own per-destination fingerprint keys (Secrets `gitops-reverser-fingerprint-…` it
/// created): agent state, never mirrored.
fn is_fingerprint_key(obj: &Value) -> bool {
    obj.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && obj.get("kind").and_then(Value::as_str) == Some("Secret")
        && obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_some_and(|n| n.starts_with("gitops-reverser-fingerprint-"))
        && obj
            .pointer("/metadata/labels/app.kubernetes.io~1managed-by")
            .and_then(Value::as_str)
            == Some("gitops-reverser")
}
const REASON_KUBE_ROOT_CA: &str = "kube-root-ca.crt";

/// Opt-ins for objects skipped by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelectionOptions {
    /// Mirror objects whose controller ownerReference says they are generated.
    pub keep_controller_owned: bool,
    /// Mirror the `kube-root-ca.crt` ConfigMap of every namespace.
    pub keep_kube_root_ca: bool,
}

impl SelectionOptions {
    /// The reason to skip `obj`, unless the matching opt-in is set.
    pub fn skip_reason(&self, obj: &Value) -> Option<&'static str> {
        match is_derived_or_generated(obj)? {
            REASON_CONTROLLER_OWNED if self.keep_controller_owned => None,
            REASON_KUBE_ROOT_CA if self.keep_kube_root_ca => None,
            reason => Some(reason),
        }
    }
}

/// Whether `group`/`resource` is sensitive under the `--sensitive-resources` `entries` (`plural` or
/// `plural.group`): core `secrets` always are, listed or not. The one rule ingestion (what is encrypted) and the
/// attribution webhook (what is never hashed nor registered) share.
pub fn is_sensitive_resource(entries: &[String], group: &str, resource: &str) -> bool {
    (group.is_empty() && resource == "secrets") || matches_entry(entries, group, resource)
}

/// `plural` entries match the resource in any group, `plural.group` entries that group only.
pub fn matches_entry(entries: &[String], group: &str, resource: &str) -> bool {
    entries.iter().any(|entry| match entry.split_once('.') {
        Some((r, g)) => r == resource && g == group,
        None => entry == resource,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DestinationRef, NamespacedName};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    fn key(group: &str, version: &str, resource: &str, namespaced: bool) -> ResourceKey {
        ResourceKey::new(group, version, resource, namespaced)
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn rule(groups: &[&str], versions: &[&str], resources: &[&str]) -> ResourceRule {
        ResourceRule {
            operations: vec![],
            api_groups: strings(groups),
            api_versions: strings(versions),
            resources: strings(resources),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: values.map(strings),
        }
    }

    #[test]
    fn name_patterns_match_whole_names_with_star_and_question_mark() {
        let cases: &[(&str, &str, bool)] = &[
            ("*-lock", "leader-lock", true),
            ("*-lock", "leader-lock-2", false),
            ("*-lock", "-lock", true),
            ("sh.helm.release.v1.*", "sh.helm.release.v1.web.v3", true),
            ("sh.helm.release.v1.*", "sh.helm.release.v2.web", false),
            ("cache-?", "cache-1", true),
            ("cache-?", "cache-12", false),
            ("cache-?", "cache-", false),
            ("*", "", true),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*b*c", "acb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("exact", "inexact", false),
            ("**x", "x", true),
            ("é?", "éü", true),
            ("web", "WEB", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                name_pattern_matches(pattern, name),
                *want,
                "{pattern:?} vs {name:?}"
            );
        }
        // Adversarial: many stars against a long near-miss finishes (quadratic at worst).
        let pattern = "*a".repeat(50) + "b";
        let name = "a".repeat(253);
        assert!(!name_pattern_matches(&pattern, &name));
    }

    #[test]
    fn invalid_name_patterns_are_reported() {
        assert_eq!(validate_name_patterns(&strings(&["*-lock", "x"])), Ok(()));
        assert_eq!(
            validate_name_patterns(&strings(&["ok", ""])),
            Err(NamePatternError::Empty)
        );
        assert_eq!(
            validate_name_patterns(&strings(&["  "])),
            Err(NamePatternError::Empty)
        );
        let long = "x".repeat(254);
        assert!(matches!(
            validate_name_patterns(&[long]),
            Err(NamePatternError::TooLong(_))
        ));
    }

    #[test]
    fn matches_resource_entries_like_admission_webhooks() {
        let deployments = key("apps", "v1", "deployments", true);
        let services = key("", "v1", "services", true);
        let clusterroles = key("rbac.authorization.k8s.io", "v1", "clusterroles", false);
        let cases: &[(&str, &ResourceKey, bool)] = &[
            ("deployments", &deployments, true),
            ("deployment", &deployments, false),
            ("deploy*", &deployments, false),
            ("*", &deployments, true),
            ("*/*", &deployments, true),
            ("deployments/*", &deployments, false),
            ("deployments/scale", &deployments, false),
            ("*/scale", &deployments, false),
            ("pods/*", &deployments, false),
            ("services", &services, true),
            ("services.", &services, true),
            (
                "clusterroles.rbac.authorization.k8s.io",
                &clusterroles,
                true,
            ),
            ("clusterroles.rbac", &clusterroles, false),
            ("roles.rbac.authorization.k8s.io", &clusterroles, false),
            ("*.apps", &deployments, true),
            ("*.apps", &services, false),
        ];
        for (entry, k, want) in cases {
            assert_eq!(
                resource_entry_matches(entry, k),
                *want,
                "{entry:?} vs {k:?}"
            );
        }
    }

    #[test]
    fn matches_api_groups_and_versions_with_wildcards() {
        let deployments = key("apps", "v1", "deployments", true);
        let configmaps = key("", "v1", "configmaps", true);
        let cases: &[(&[&str], &[&str], &ResourceKey, bool)] = &[
            (&[], &[], &deployments, true),
            (&["*"], &["*"], &deployments, true),
            (&["apps"], &["v1"], &deployments, true),
            (&["apps"], &["v1beta1"], &deployments, false),
            (&[""], &[], &deployments, false),
            (&[""], &[], &configmaps, true),
            (&["apps"], &[], &configmaps, false),
            (&["", "apps"], &["v1"], &configmaps, true),
        ];
        for (groups, versions, k, want) in cases {
            let r = rule(groups, versions, &["*"]);
            assert_eq!(
                resource_rule_selects(&r, k),
                *want,
                "{groups:?} {versions:?} {k:?}"
            );
        }
    }

    #[test]
    fn empty_resources_select_the_desired_state_preset() {
        let r = rule(&[], &[], &[]);
        for (group, resource) in DESIRED_STATE_PRESET {
            let namespaced = !matches!(
                *resource,
                "clusterroles"
                    | "clusterrolebindings"
                    | "priorityclasses"
                    | "customresourcedefinitions"
                    | "apiservices"
                    | "storageclasses"
            );
            let k = key(group, "v1", resource, namespaced);
            let cluster_rule = ClusterResourceRule {
                operations: vec![],
                api_groups: vec![],
                api_versions: vec![],
                resources: vec![],
                scope: if namespaced {
                    ResourceScope::Namespaced
                } else {
                    ResourceScope::Cluster
                },
                namespace_selector: None,
            };
            assert!(cluster_resource_rule_selects(&cluster_rule, &k), "{k:?}");
            assert_eq!(resource_rule_selects(&r, &k), namespaced, "{k:?}");
        }
        for k in [
            key("", "v1", "persistentvolumeclaims", true),
            key("", "v1", "namespaces", false),
            key("example.com", "v1", "widgets", true),
            key("apps", "v1", "replicasets", true),
        ] {
            assert!(!resource_rule_selects(&r, &k), "{k:?} is not in the preset");
        }
    }

    #[test]
    fn empty_resources_intersect_preset_with_api_groups() {
        let r = rule(&["apps"], &[], &[]);
        assert!(resource_rule_selects(
            &r,
            &key("apps", "v1", "deployments", true)
        ));
        assert!(!resource_rule_selects(
            &r,
            &key("", "v1", "configmaps", true)
        ));
    }

    #[test]
    fn default_exclusions_apply_even_to_explicit_and_wildcard_entries() {
        let excluded = [
            key("", "v1", "pods", true),
            key("", "v1", "events", true),
            key("events.k8s.io", "v1", "events", true),
            key("coordination.k8s.io", "v1", "leases", true),
            key("", "v1", "endpoints", true),
            key("discovery.k8s.io", "v1", "endpointslices", true),
            key("apps", "v1", "controllerrevisions", true),
            key("flowcontrol.apiserver.k8s.io", "v1", "flowschemas", false),
            key(
                "flowcontrol.apiserver.k8s.io",
                "v1",
                "prioritylevelconfigurations",
                false,
            ),
            key("batch", "v1", "jobs", true),
            key("batch", "v1", "cronjobs", true),
        ];
        for k in &excluded {
            let explicit = rule(&[], &[], &[k.resource.as_str()]);
            let scope = if k.namespaced {
                ResourceScope::Namespaced
            } else {
                ResourceScope::Cluster
            };
            let wildcard = ClusterResourceRule {
                operations: vec![],
                api_groups: strings(&["*"]),
                api_versions: strings(&["*"]),
                resources: strings(&["*"]),
                scope,
                namespace_selector: None,
            };
            assert!(is_default_excluded(k), "{k:?}");
            assert!(!resource_rule_selects(&explicit, k), "{k:?}");
            assert!(!cluster_resource_rule_selects(&wildcard, k), "{k:?}");
        }
        // Same plural in another group is not excluded.
        assert!(!is_default_excluded(&key(
            "example.com",
            "v1",
            "jobs",
            true
        )));
    }

    #[test]
    fn matches_operations_with_wildcard_and_empty_list() {
        use OperationType as T;
        let cases: &[(&[T], Operation, bool)] = &[
            (&[], Operation::Delete, true),
            (&[T::All], Operation::Update, true),
            (&[T::Create], Operation::Create, true),
            (&[T::Create], Operation::Update, false),
            (&[T::Create, T::Delete], Operation::Delete, true),
            (&[T::Update], Operation::Delete, false),
        ];
        for (ops, op, want) in cases {
            assert_eq!(operation_matches(ops, *op), *want, "{ops:?} {op:?}");
        }
    }

    #[test]
    fn evaluates_label_selectors_with_full_semantics() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases: Vec<(LabelSelector, bool)> = vec![
            (LabelSelector::default(), true),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("app", "web")])),
                    ..Default::default()
                },
                true,
            ),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("app", "db")])),
                    ..Default::default()
                },
                false,
            ),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("env", "prod")])),
                    ..Default::default()
                },
                false,
            ),
            (sel(vec![expr("app", "In", Some(&["web", "api"]))]), true),
            (sel(vec![expr("app", "In", Some(&["db"]))]), false),
            (sel(vec![expr("env", "In", Some(&["prod"]))]), false),
            (sel(vec![expr("app", "NotIn", Some(&["db"]))]), true),
            (sel(vec![expr("app", "NotIn", Some(&["web"]))]), false),
            (sel(vec![expr("env", "NotIn", Some(&["prod"]))]), true),
            (sel(vec![expr("tier", "Exists", None)]), true),
            (sel(vec![expr("env", "Exists", None)]), false),
            (sel(vec![expr("env", "DoesNotExist", None)]), true),
            (sel(vec![expr("app", "DoesNotExist", Some(&[]))]), false),
            (
                LabelSelector {
                    match_labels: Some(labels(&[("app", "web")])),
                    match_expressions: Some(vec![expr("tier", "In", Some(&["back"]))]),
                },
                false,
            ),
        ];
        for (selector, want) in cases {
            assert_eq!(
                label_selector_matches(&selector, &l),
                Ok(want),
                "{selector:?}"
            );
        }
    }

    fn sel(exprs: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(exprs),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_invalid_label_selectors() {
        let l = labels(&[]);
        assert!(matches!(
            label_selector_matches(&sel(vec![expr("a", "Equals", Some(&["x"]))]), &l),
            Err(SelectorError::UnknownOperator(_))
        ));
        assert!(matches!(
            label_selector_matches(&sel(vec![expr("a", "In", None)]), &l),
            Err(SelectorError::ValuesRequired { .. })
        ));
        assert!(matches!(
            label_selector_matches(&sel(vec![expr("a", "Exists", Some(&["x"]))]), &l),
            Err(SelectorError::ValuesForbidden { .. })
        ));
    }

    fn watch_rule(selector: Option<LabelSelector>, rules: Vec<ResourceRule>) -> WatchRuleSpec {
        WatchRuleSpec {
            destination_ref: DestinationRef {
                name: "prod".into(),
                namespace: None,
            },
            object_selector: selector,
            rules,
            ignore: None,
            exclude_names: vec![],
        }
    }

    #[test]
    fn watch_rule_only_sees_its_own_namespace() {
        let spec = watch_rule(None, vec![rule(&[], &[], &["configmaps"])]);
        let cm = key("", "v1", "configmaps", true);
        let l = labels(&[]);
        let in_shop = ObjectFacts {
            namespace: Some("shop"),
            labels: &l,
        };
        let in_other = ObjectFacts {
            namespace: Some("other"),
            labels: &l,
        };
        assert!(watch_rule_matches(
            "shop",
            &spec,
            &cm,
            Operation::Create,
            in_shop
        ));
        assert!(!watch_rule_matches(
            "shop",
            &spec,
            &cm,
            Operation::Create,
            in_other
        ));
    }

    #[test]
    fn watch_rule_never_selects_cluster_scoped_types() {
        let spec = watch_rule(None, vec![rule(&["*"], &["*"], &["*"])]);
        let l = labels(&[]);
        let obj = ObjectFacts {
            namespace: None,
            labels: &l,
        };
        let k = key("rbac.authorization.k8s.io", "v1", "clusterroles", false);
        assert!(!watch_rule_matches(
            "shop",
            &spec,
            &k,
            Operation::Update,
            obj
        ));
    }

    #[test]
    fn watch_rule_applies_object_selector_and_operations() {
        let mut only_deletes = rule(&[], &[], &["configmaps"]);
        only_deletes.operations = vec![OperationType::Delete];
        let selector = LabelSelector {
            match_labels: Some(labels(&[("mirror", "yes")])),
            ..Default::default()
        };
        let spec = watch_rule(Some(selector), vec![only_deletes]);
        let cm = key("", "v1", "configmaps", true);
        let yes = labels(&[("mirror", "yes")]);
        let no = labels(&[]);
        let facts = |l| ObjectFacts {
            namespace: Some("shop"),
            labels: l,
        };
        assert!(watch_rule_matches(
            "shop",
            &spec,
            &cm,
            Operation::Delete,
            facts(&yes)
        ));
        assert!(!watch_rule_matches(
            "shop",
            &spec,
            &cm,
            Operation::Update,
            facts(&yes)
        ));
        assert!(!watch_rule_matches(
            "shop",
            &spec,
            &cm,
            Operation::Delete,
            facts(&no)
        ));
    }

    #[test]
    fn watch_rule_with_invalid_selector_selects_nothing() {
        let spec = watch_rule(
            Some(sel(vec![expr("a", "Bogus", None)])),
            vec![rule(&[], &[], &[])],
        );
        let l = labels(&[]);
        let obj = ObjectFacts {
            namespace: Some("shop"),
            labels: &l,
        };
        assert!(!watch_rule_matches(
            "shop",
            &spec,
            &key("", "v1", "configmaps", true),
            Operation::Create,
            obj
        ));
    }

    fn cluster_rule(
        scope: ResourceScope,
        selector: Option<LabelSelector>,
        resources: &[&str],
    ) -> ClusterWatchRuleSpec {
        ClusterWatchRuleSpec {
            destination_ref: NamespacedName {
                name: "prod".into(),
                namespace: "configbutler-system".into(),
            },
            object_selector: None,
            rules: vec![ClusterResourceRule {
                operations: vec![],
                api_groups: vec![],
                api_versions: vec![],
                resources: strings(resources),
                scope,
                namespace_selector: selector,
            }],
            ignore: None,
            exclude_names: vec![],
        }
    }

    #[test]
    fn cluster_rule_scope_separates_cluster_and_namespaced_types() {
        let cluster = cluster_rule(ResourceScope::Cluster, None, &["*"]);
        let namespaced = cluster_rule(ResourceScope::Namespaced, None, &["*"]);
        let l = labels(&[]);
        let cr = key("rbac.authorization.k8s.io", "v1", "clusterroles", false);
        let cm = key("", "v1", "configmaps", true);
        assert!(cluster_watch_rule_matches(
            &cluster,
            &cr,
            Operation::Create,
            None
        ));
        assert!(!cluster_watch_rule_matches(
            &cluster,
            &cm,
            Operation::Create,
            Some(&l)
        ));
        assert!(cluster_watch_rule_matches(
            &namespaced,
            &cm,
            Operation::Create,
            Some(&l)
        ));
        assert!(!cluster_watch_rule_matches(
            &namespaced,
            &cr,
            Operation::Create,
            None
        ));
    }

    #[test]
    fn cluster_rule_namespace_selector_uses_namespace_labels() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("team", "shop")])),
            ..Default::default()
        };
        let spec = cluster_rule(ResourceScope::Namespaced, Some(selector), &["configmaps"]);
        let cm = key("", "v1", "configmaps", true);
        let shop_ns = labels(&[("team", "shop")]);
        let other_ns = labels(&[("team", "other")]);
        assert!(cluster_watch_rule_matches(
            &spec,
            &cm,
            Operation::Update,
            Some(&shop_ns)
        ));
        assert!(!cluster_watch_rule_matches(
            &spec,
            &cm,
            Operation::Update,
            Some(&other_ns)
        ));
        assert!(!cluster_watch_rule_matches(
            &spec,
            &cm,
            Operation::Update,
            None
        ));
    }

    #[test]
    fn cluster_rule_from_seed_example_selects_rbac_cluster_types() {
        let spec = cluster_rule(
            ResourceScope::Cluster,
            None,
            &[
                "clusterroles.rbac.authorization.k8s.io",
                "clusterrolebindings.rbac.authorization.k8s.io",
            ],
        );
        for (resource, want) in [
            ("clusterroles", true),
            ("clusterrolebindings", true),
            ("roles", false),
        ] {
            let namespaced = resource == "roles";
            let k = key("rbac.authorization.k8s.io", "v1", resource, namespaced);
            assert_eq!(
                cluster_watch_rule_matches(&spec, &k, Operation::Create, None),
                want,
                "{resource}"
            );
        }
    }

    #[test]
    fn reads_labels_from_raw_objects() {
        let obj = json!({"metadata": {"labels": {"a": "1", "bad": 2}}});
        assert_eq!(labels_of(&obj), labels(&[("a", "1")]));
        assert!(labels_of(&json!({"metadata": {}})).is_empty());
    }

    #[test]
    fn flags_derived_and_generated_objects() {
        let cases = [
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x",
                    "ownerReferences": [{"kind": "Foo", "name": "f", "controller": true}]}}),
                Some("controller-owned"),
            ),
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x",
                    "ownerReferences": [{"kind": "Foo", "name": "f"}, {"kind": "Bar", "name": "b", "controller": false}]}}),
                None,
            ),
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt", "namespace": "a"}}),
                Some("kube-root-ca.crt"),
            ),
            (
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kube-root-ca.crt"}}),
                None,
            ),
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"}}),
                None,
            ),
            (
                json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {
                    "name": "v1.demo.example.com",
                    "labels": {"kube-aggregator.kubernetes.io/automanaged": "true"}}}),
                Some("automanaged-apiservice"),
            ),
            (
                json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {
                    "name": "v1.apps", "labels": {"kube-aggregator.kubernetes.io/automanaged": "onstart"}}}),
                Some("automanaged-apiservice"),
            ),
            (
                json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {
                    "name": "v1beta1.metrics.k8s.io", "labels": {"k8s-app": "metrics-server"}}}),
                None,
            ),
        ];
        for (obj, want) in cases {
            assert_eq!(is_derived_or_generated(&obj), want, "{obj}");
        }
    }

    #[test]
    fn selection_options_keep_skipped_objects_on_request() {
        let owned = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x",
            "ownerReferences": [{"controller": true}]}});
        let root_ca = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"}});
        let defaults = SelectionOptions::default();
        assert_eq!(defaults.skip_reason(&owned), Some("controller-owned"));
        assert_eq!(defaults.skip_reason(&root_ca), Some("kube-root-ca.crt"));
        let keep_owned = SelectionOptions {
            keep_controller_owned: true,
            ..Default::default()
        };
        assert_eq!(keep_owned.skip_reason(&owned), None);
        assert_eq!(keep_owned.skip_reason(&root_ca), Some("kube-root-ca.crt"));
        let keep_ca = SelectionOptions {
            keep_kube_root_ca: true,
            ..Default::default()
        };
        assert_eq!(keep_ca.skip_reason(&root_ca), None);
        assert_eq!(keep_ca.skip_reason(&owned), Some("controller-owned"));
    }
}
