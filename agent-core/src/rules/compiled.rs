//! Rules bound to their destination ([`CompiledRule`]): which types a rule watches, which objects and changes it
//! selects, and which snapshot scopes it covers. The matching primitives are in the parent module ([`crate::rules`]);
//! [`crate::config::resolve`] compiles the rules that pass the access checks.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    self as rules, ObjectFacts, Operation, ResourceKey, cluster_resource_rule_selects,
    label_selector_matches, resource_rule_selects,
};
use crate::crd::{ClusterWatchRuleSpec, IgnoreSpec, ResourceScope, WatchRuleSpec};

/// Labels per namespace name.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// A `WatchRule` or `ClusterWatchRule` bound to its destination.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledRule {
    /// `WatchRule/{namespace}/{name}` or `ClusterWatchRule/{name}`, for logs and conditions.
    pub id: String,
    /// `namespace/name` of the destination ([`crate::events::DestinationDecl::key`]).
    pub destination: String,
    pub kind: RuleKind,
}

/// The two rule flavours.
#[derive(Clone, Debug, PartialEq)]
pub enum RuleKind {
    /// A `WatchRule`: namespaced objects of its own namespace only.
    Namespaced {
        namespace: String,
        spec: WatchRuleSpec,
    },
    /// A `ClusterWatchRule`: cluster-scoped objects and namespaced objects across namespaces.
    Cluster { spec: ClusterWatchRuleSpec },
}

impl CompiledRule {
    /// Whether the rule selects the type at all (operations and label selectors aside).
    pub fn selects_type(&self, key: &ResourceKey) -> bool {
        match &self.kind {
            RuleKind::Namespaced { spec, .. } => {
                spec.rules.iter().any(|r| resource_rule_selects(r, key))
            }
            RuleKind::Cluster { spec } => spec
                .rules
                .iter()
                .any(|r| cluster_resource_rule_selects(r, key)),
        }
    }

    /// The rule's `ignore` setting, if any.
    pub fn ignore_spec(&self) -> Option<&IgnoreSpec> {
        match &self.kind {
            RuleKind::Namespaced { spec, .. } => spec.ignore.as_ref(),
            RuleKind::Cluster { spec } => spec.ignore.as_ref(),
        }
    }

    /// Whether the rule's `excludeNames` leaves out an object of this name.
    pub fn excludes_name(&self, name: &str) -> bool {
        let patterns = match &self.kind {
            RuleKind::Namespaced { spec, .. } => &spec.exclude_names,
            RuleKind::Cluster { spec } => &spec.exclude_names,
        };
        patterns
            .iter()
            .any(|pattern| rules::name_pattern_matches(pattern, name))
    }

    /// Whether objects of this type must be watched in every namespace for this rule.
    pub fn needs_all_namespaces(&self) -> bool {
        matches!(self.kind, RuleKind::Cluster { .. })
    }

    /// Whether the rule selects this object for this change.
    pub fn matches(
        &self,
        key: &ResourceKey,
        op: Operation,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
        namespace_labels: &NamespaceLabels,
    ) -> bool {
        match &self.kind {
            RuleKind::Namespaced {
                namespace: rule_ns,
                spec,
            } => {
                rules::watch_rule_matches(rule_ns, spec, key, op, ObjectFacts { namespace, labels })
            }
            RuleKind::Cluster { spec } => {
                if !rules::object_selector_admits(spec.object_selector.as_ref(), labels) {
                    return false;
                }
                let ns_labels = namespace
                    .filter(|ns| !ns.is_empty())
                    .and_then(|ns| namespace_labels.get(ns));
                rules::cluster_watch_rule_matches(spec, key, op, ns_labels)
            }
        }
    }

    /// Whether the rule selects the object in its current state, whatever the operation: this
    /// decides membership in a snapshot and "stopped matching" deletes, while operations only
    /// filter live changes.
    pub fn selects_object(
        &self,
        key: &ResourceKey,
        namespace: Option<&str>,
        labels: &BTreeMap<String, String>,
        namespace_labels: &NamespaceLabels,
    ) -> bool {
        [Operation::Create, Operation::Update, Operation::Delete]
            .into_iter()
            .any(|op| self.matches(key, op, namespace, labels, namespace_labels))
    }

    /// The snapshot namespaces this rule covers for a type (`""`: all namespaces, or the
    /// cluster-scoped type). A snapshot end lets the writer delete unsent files of that scope, so
    /// scopes are as narrow as the rule: a `WatchRule` covers its own namespace, a
    /// `ClusterWatchRule` with a namespace selector only the namespaces that match now.
    pub fn snapshot_namespaces(
        &self,
        key: &ResourceKey,
        namespace_labels: &NamespaceLabels,
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        match &self.kind {
            RuleKind::Namespaced { namespace, .. } => {
                if key.namespaced && self.selects_type(key) {
                    out.insert(namespace.clone());
                }
            }
            RuleKind::Cluster { spec } => {
                for rule in spec
                    .rules
                    .iter()
                    .filter(|r| cluster_resource_rule_selects(r, key))
                {
                    match (&rule.namespace_selector, rule.scope) {
                        (Some(selector), ResourceScope::Namespaced) => {
                            out.extend(
                                namespace_labels
                                    .iter()
                                    .filter(|(_, labels)| {
                                        label_selector_matches(selector, labels).unwrap_or(false)
                                    })
                                    .map(|(ns, _)| ns.clone()),
                            );
                        }
                        _ => {
                            out.insert(String::new());
                        }
                    }
                }
            }
        }
        if out.contains("") {
            // All namespaces cover each single one; sending both would sweep twice.
            out.retain(String::is_empty);
        }
        out
    }

    /// Whether evaluating the rule needs namespace labels.
    pub fn uses_namespace_labels(&self) -> bool {
        match &self.kind {
            RuleKind::Namespaced { .. } => false,
            RuleKind::Cluster { spec } => spec.rules.iter().any(|r| r.namespace_selector.is_some()),
        }
    }

    /// With `--watch-all`, a rule that leaves `resources` empty selects every type instead of
    /// the desired-state preset (the always-on exclusions still apply).
    pub fn widened_for_watch_all(&self) -> Self {
        let mut out = self.clone();
        match &mut out.kind {
            RuleKind::Namespaced { spec, .. } => {
                for r in &mut spec.rules {
                    if r.resources.is_empty() {
                        r.resources = vec!["*".to_owned()];
                    }
                }
            }
            RuleKind::Cluster { spec } => {
                for r in &mut spec.rules {
                    if r.resources.is_empty() {
                        r.resources = vec!["*".to_owned()];
                    }
                }
            }
        }
        out
    }
}

#[cfg(any(test, feature = "test-support"))]
pub mod test_support {
    //! Small builders shared by the rule, configuration and ingestion unit tests.

    use super::*;
    use crate::crd::{
        ClusterResourceRule, DestinationRef, NamespacedName, ResourceRule, ResourceScope,
    };
    use crate::events::DestinationDecl;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    pub fn decl(key: &str) -> DestinationDecl {
        DestinationDecl {
            key: key.to_owned(),
            repo_url: "file:///repo.git".into(),
            branch: "main".into(),
            base_folder: format!("clusters/{}", key.replace('/', "-")),
            exclusive_mode: false,
            credentials_reference: None,
            credentials: None,
            encryption: None,
            prune: Default::default(),
            commit_message: None,
            suspend: false,
            placement: Default::default(),
        }
    }

    pub fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    pub fn watch_rule(
        ns: &str,
        destination: &str,
        resources: &[&str],
        selector: Option<LabelSelector>,
    ) -> CompiledRule {
        CompiledRule {
            id: format!("WatchRule/{ns}/r"),
            destination: destination.to_owned(),
            kind: RuleKind::Namespaced {
                namespace: ns.to_owned(),
                spec: WatchRuleSpec {
                    destination_ref: DestinationRef {
                        name: "d".into(),
                        namespace: None,
                    },
                    object_selector: selector,
                    rules: vec![ResourceRule {
                        resources: strings(resources),
                        ..Default::default()
                    }],
                    ignore: None,
                    exclude_names: vec![],
                },
            },
        }
    }

    pub fn cluster_rule(
        destination: &str,
        scope: ResourceScope,
        resources: &[&str],
        namespace_selector: Option<LabelSelector>,
    ) -> CompiledRule {
        CompiledRule {
            id: "ClusterWatchRule/c".into(),
            destination: destination.to_owned(),
            kind: RuleKind::Cluster {
                spec: ClusterWatchRuleSpec {
                    destination_ref: NamespacedName {
                        name: "d".into(),
                        namespace: "x".into(),
                    },
                    object_selector: None,
                    rules: vec![ClusterResourceRule {
                        operations: vec![],
                        api_groups: vec![],
                        api_versions: vec![],
                        resources: strings(resources),
                        scope,
                        namespace_selector,
                    }],
                    ignore: None,
                    exclude_names: vec![],
                },
            },
        }
    }

    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    pub fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn snapshot_scope_of_a_watch_rule_is_its_own_namespace() {
        let r = watch_rule("shop", "shop/prod", &["configmaps"], None);
        let cm = ResourceKey::new("", "v1", "configmaps", true);
        assert_eq!(
            r.snapshot_namespaces(&cm, &NamespaceLabels::new()),
            BTreeSet::from(["shop".to_owned()])
        );
    }

    #[test]
    fn a_cluster_rules_object_selector_admits_only_matching_labels_of_any_scope() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let with_selector = |scope, resources: &[&str], selector: LabelSelector| {
            let mut rule = cluster_rule("x/prod", scope, resources, None);
            let RuleKind::Cluster { spec } = &mut rule.kind else {
                unreachable!()
            };
            spec.object_selector = Some(selector);
            rule
        };
        let mirror_yes = match_labels(&[("mirror", "yes")]);
        let cms = with_selector(
            ResourceScope::Namespaced,
            &["configmaps"],
            mirror_yes.clone(),
        );
        let roles = with_selector(ResourceScope::Cluster, &["clusterroles"], mirror_yes);
        let cm = ResourceKey::new("", "v1", "configmaps", true);
        let role = ResourceKey::new("rbac.authorization.k8s.io", "v1", "clusterroles", false);
        let none = NamespaceLabels::new();
        let picked = labels(&[("mirror", "yes")]);
        let other = labels(&[("mirror", "no")]);
        assert!(cms.selects_object(&cm, Some("shop"), &picked, &none));
        assert!(!cms.selects_object(&cm, Some("shop"), &other, &none));
        assert!(!cms.selects_object(&cm, Some("shop"), &BTreeMap::new(), &none));
        assert!(roles.selects_object(&role, None, &picked, &none));
        assert!(!roles.selects_object(&role, None, &other, &none));
        // An invalid selector admits nothing.
        let invalid = with_selector(
            ResourceScope::Namespaced,
            &["configmaps"],
            LabelSelector {
                match_expressions: Some(vec![
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: "mirror".into(),
                        operator: "Sometimes".into(),
                        values: None,
                    },
                ]),
                ..Default::default()
            },
        );
        assert!(!invalid.selects_object(&cm, Some("shop"), &picked, &none));
    }

    #[test]
    fn snapshot_scope_of_a_namespace_selector_is_only_the_matching_namespaces() {
        let r = cluster_rule(
            "x/prod",
            ResourceScope::Namespaced,
            &["configmaps"],
            Some(match_labels(&[("team", "a")])),
        );
        let ns = NamespaceLabels::from([
            ("a1".to_owned(), labels(&[("team", "a")])),
            ("b1".to_owned(), labels(&[("team", "b")])),
            ("a2".to_owned(), labels(&[("team", "a")])),
        ]);
        let cm = ResourceKey::new("", "v1", "configmaps", true);
        assert_eq!(
            r.snapshot_namespaces(&cm, &ns),
            BTreeSet::from(["a1".to_owned(), "a2".to_owned()])
        );
    }

    #[test]
    fn snapshot_scope_of_an_unrestricted_cluster_rule_is_all_namespaces() {
        let r = cluster_rule("x/prod", ResourceScope::Namespaced, &["configmaps"], None);
        let cm = ResourceKey::new("", "v1", "configmaps", true);
        assert_eq!(
            r.snapshot_namespaces(&cm, &NamespaceLabels::new()),
            BTreeSet::from([String::new()])
        );
    }

    #[test]
    fn watch_all_widens_only_rules_without_resources() {
        let preset = watch_rule("shop", "shop/prod", &[], None);
        let widget = ResourceKey::new("example.com", "v1", "widgets", true);
        assert!(!preset.selects_type(&widget));
        assert!(preset.widened_for_watch_all().selects_type(&widget));
        let explicit = watch_rule("shop", "shop/prod", &["configmaps"], None);
        assert!(!explicit.widened_for_watch_all().selects_type(&widget));
        // The always-on exclusions survive widening.
        let pods = ResourceKey::new("", "v1", "pods", true);
        assert!(!preset.widened_for_watch_all().selects_type(&pods));
    }

    #[test]
    fn membership_ignores_operations() {
        let mut r = watch_rule("shop", "shop/prod", &["configmaps"], None);
        if let RuleKind::Namespaced { spec, .. } = &mut r.kind {
            spec.rules[0].operations = vec![crate::crd::OperationType::Delete];
        }
        let cm = ResourceKey::new("", "v1", "configmaps", true);
        let l = labels(&[]);
        let ns = NamespaceLabels::new();
        assert!(!r.matches(&cm, Operation::Update, Some("shop"), &l, &ns));
        assert!(r.selects_object(&cm, Some("shop"), &l, &ns));
    }
}
