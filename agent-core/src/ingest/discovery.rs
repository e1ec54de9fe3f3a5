//! Which types exist (`reverser_agent::ingest::discovery::discover` asks the API server) and which watches to run ([`desired_watches`]).
//!
//! ```text
//! API server ──discover──▶ [DiscoveredResource]   (list+watch verbs, one version per group/resource)
//!                                  │
//! Selection (rules) ──────────────▶ desired_watches ──▶ DesiredWatches { plans, skipped }
//! DiscoveryOptions (--watch-all,    (pure: exclusions, preset, Secrets, cap, watch scopes,
//!  --discovery-exclude, cap)          destinations and snapshot scopes per watch)
//! ```
//!
//! One watch runs per (type, scope), shared by every rule and destination that selects the
//! type: a `ClusterWatchRule` makes the watch cluster-wide, otherwise there is one namespaced
//! watch per `WatchRule` namespace, up to `--max-namespaced-watches-per-type` namespaces. Above
//! that the type gets one cluster-wide watch (one LIST and one stream instead of thousands); its
//! index drops objects of the namespaces no rule covers, and snapshots stay scoped to the rules'
//! namespaces. A type whose cluster-wide list is forbidden (namespaced RBAC only) falls back to
//! one watch per namespace. Never N×M watches for N rules and M destinations.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::discovery::ApiResource;
use tracing::{info, warn};

use crate::config::Selection;
use crate::events::{DestinationDecl, ScopeRef};
use crate::rules::compiled::{CompiledRule, NamespaceLabels};
use crate::rules::{
    ResourceKey, in_desired_state_preset, is_default_excluded, is_sensitive_resource, matches_entry,
};

/// Default upper bound on concurrently watched types.
pub const DEFAULT_MAX_GVKS: usize = 300;

/// Default for `--max-namespaced-watches-per-type`: above this many `WatchRule` namespaces, a type is
/// watched cluster-wide. Well under the API server's concurrent HTTP/2 streams per connection (Go's
/// default is 250), and one LIST instead of hundreds at start.
pub const DEFAULT_MAX_NAMESPACED_WATCHES_PER_TYPE: usize = 100;

/// A type the server serves with `list` and `watch`, at the version ingestion uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiscoveredResource {
    /// Group, chosen version, plural and scope.
    pub key: ResourceKey,
    pub kind: String,
    /// Other versions of the same group/resource that discovery showed (served now, or mirrored earlier by this
    /// process and replaced by `key.version`). The type is mirrored at one version only, so each complete snapshot
    /// also clears these versions' folders of the same scope: a CRD whose preferred version moved from v1 to v2
    /// leaves no stale `v1/` copies behind. Never filled from a failed or partial discovery: only a discovery that
    /// lists the resource under `key.version` puts versions here.
    pub superseded: BTreeSet<String>,
}

impl DiscoveredResource {
    pub fn new(group: &str, version: &str, resource: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            key: ResourceKey::new(group, version, resource, namespaced),
            kind: kind.to_owned(),
            superseded: BTreeSet::new(),
        }
    }

    /// The same type, whose snapshots also clear the folders of `versions` (its own version excepted).
    pub fn with_superseded<I, S>(mut self, versions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.superseded = versions
            .into_iter()
            .map(Into::into)
            .filter(|v| *v != self.key.version)
            .collect();
        self
    }

    /// `v1` for core, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.key.group.is_empty() {
            self.key.version.clone()
        } else {
            format!("{}/{}", self.key.group, self.key.version)
        }
    }

    /// The kube-rs type descriptor for `Api<DynamicObject>`.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.key.group.clone(),
            version: self.key.version.clone(),
            api_version: self.api_version(),
            kind: self.kind.clone(),
            plural: self.key.resource.clone(),
        }
    }

    /// `(group, plural)`: the identity across versions.
    pub fn group_resource(&self) -> (String, String) {
        (self.key.group.clone(), self.key.resource.clone())
    }

    /// The `resource` label of per-type metrics: `configmaps`, `deployments.apps`.
    pub fn metric_label(&self) -> String {
        if self.key.group.is_empty() {
            self.key.resource.clone()
        } else {
            format!("{}.{}", self.key.resource, self.key.group)
        }
    }
}

/// Discovery-level options (flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryOptions {
    /// `--watch-all`: rules without `resources` select every discovered type instead of the
    /// desired-state preset.
    pub watch_all: bool,
    /// `--discovery-exclude`: `plural` (any group) or `plural.group` entries never watched, on
    /// top of [`crate::rules::DEFAULT_EXCLUSIONS`].
    pub exclude: Vec<String>,
    /// Upper bound on watched types (maxGVKs).
    pub max_gvks: usize,
    /// `--sensitive-resources`: `plural` (any group) or `plural.group` types that are only ever sent
    /// SOPS-encrypted, to destinations with encryption configured. Core `secrets` always are, listed or not.
    pub sensitive: Vec<String>,
    /// `--max-namespaced-watches-per-type`: a type selected only by `WatchRule`s in more namespaces than
    /// this is watched cluster-wide (its objects of other namespaces are dropped). 0: always cluster-wide.
    pub max_namespaced_watches_per_type: usize,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            watch_all: false,
            exclude: Vec::new(),
            max_gvks: DEFAULT_MAX_GVKS,
            sensitive: vec!["secrets".to_owned()],
            max_namespaced_watches_per_type: DEFAULT_MAX_NAMESPACED_WATCHES_PER_TYPE,
        }
    }
}

impl DiscoveryOptions {
    fn excludes(&self, key: &ResourceKey) -> bool {
        matches_entry(&self.exclude, &key.group, &key.resource)
    }

    /// Whether objects of this type are only ever sent encrypted (core Secrets always are).
    pub fn is_sensitive(&self, key: &ResourceKey) -> bool {
        is_sensitive_resource(&self.sensitive, &key.group, &key.resource)
    }
}

impl DiscoveryOptions {}

/// Identifies one watch: a type at one version, in one namespace or (`""`) in all of them /
/// cluster-wide.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchKey {
    pub group: String,
    pub version: String,
    pub resource: String,
    /// `""`: all namespaces, or a cluster-scoped type.
    pub namespace: String,
}

impl WatchKey {
    /// The snapshot scope of this type in `namespace`.
    pub fn scope(&self, namespace: &str) -> ScopeRef {
        self.scope_at(&self.version, namespace)
    }

    /// The snapshot scope of this type at another `version` (a superseded one) in `namespace`.
    pub fn scope_at(&self, version: &str, namespace: &str) -> ScopeRef {
        ScopeRef {
            group: self.group.clone(),
            version: version.to_owned(),
            resource: self.resource.clone(),
            namespace: namespace.to_owned(),
        }
    }
}

impl std::fmt::Display for WatchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{group}/{}/{}", self.version, self.resource)?;
        if !self.namespace.is_empty() {
            write!(f, " in {}", self.namespace)?;
        }
        Ok(())
    }
}

/// Where one watch's objects go for one destination.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRoute {
    pub destination: DestinationDecl,
    /// The destination's rules that select this type.
    pub rules: Vec<CompiledRule>,
    /// Snapshot scopes (namespaces; `""` = all / cluster-scoped) each relist opens and closes.
    pub snapshot_namespaces: BTreeSet<String>,
}

/// Everything one watch needs. A running watch whose plan changes is restarted: it relists
/// and opens new snapshot epochs, which is always correct (the writer makes repeats no-ops).
#[derive(Clone, Debug, PartialEq)]
pub struct WatchPlan {
    pub key: WatchKey,
    pub resource: DiscoveredResource,
    /// Sorted by destination key.
    pub routes: Vec<DestinationRoute>,
    /// Namespace labels, only when a route's rule has a namespace selector (so that label
    /// changes restart only the watches they affect).
    pub namespace_labels: NamespaceLabels,
    /// A sensitive type (Secrets): objects are sent only SOPS-encrypted, and every route has encryption.
    pub sensitive: bool,
}

impl WatchPlan {
    /// Whether this is a cluster-wide watch only because its `WatchRule`s cover more namespaces than
    /// `--max-namespaced-watches-per-type` (no `ClusterWatchRule` needs every namespace): if the cluster-wide
    /// list is forbidden, the type can fall back to one watch per namespace.
    pub fn merges_namespaces(&self) -> bool {
        self.key.namespace.is_empty()
            && self.resource.key.namespaced
            && !self
                .routes
                .iter()
                .flat_map(|r| &r.rules)
                .any(CompiledRule::needs_all_namespaces)
    }

    /// The namespaces whose objects any route may select; `None`: every namespace (or a cluster-scoped type).
    pub fn covered_namespaces(&self) -> Option<BTreeSet<&str>> {
        let mut out = BTreeSet::new();
        for ns in self.routes.iter().flat_map(|r| &r.snapshot_namespaces) {
            if ns.is_empty() {
                return None;
            }
            out.insert(ns.as_str());
        }
        Some(out)
    }
}

/// Why a selected type is not watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// A sensitive type (Secrets) that no selecting rule's destination encrypts: never sent in plaintext.
    Secret,
    /// Over the maxGVKs cap.
    Capped,
}

/// The result of planning.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredWatches {
    pub plans: BTreeMap<WatchKey, WatchPlan>,
    /// Types some rule selects but that are not watched, and why.
    pub skipped: Vec<(ResourceKey, SkipReason)>,
}

/// Computes the set of watches from discovered types, the selection and the options. Pure.
pub fn desired_watches(
    discovered: &[DiscoveredResource],
    selection: &Selection,
    options: &DiscoveryOptions,
) -> DesiredWatches {
    desired_watches_with(discovered, selection, options, &BTreeSet::new())
}

/// [`desired_watches`], where the types in `cluster_list_forbidden` (`(group, resource)`: their cluster-wide
/// list was refused with a 403) keep one watch per `WatchRule` namespace whatever their number. Pure.
pub fn desired_watches_with(
    discovered: &[DiscoveredResource],
    selection: &Selection,
    options: &DiscoveryOptions,
    cluster_list_forbidden: &BTreeSet<(String, String)>,
) -> DesiredWatches {
    let rules: Vec<CompiledRule> = selection
        .rules
        .iter()
        // A rule whose destination is not declared has nowhere to write.
        .filter(|r| selection.destination(&r.destination).is_some())
        .map(|r| {
            if options.watch_all {
                r.widened_for_watch_all()
            } else {
                r.clone()
            }
        })
        .collect();

    let mut out = DesiredWatches::default();
    let mut selected: Vec<(&DiscoveredResource, Vec<&CompiledRule>)> = Vec::new();
    for res in discovered {
        if is_default_excluded(&res.key) || options.excludes(&res.key) {
            continue;
        }
        let mut selecting: Vec<&CompiledRule> =
            rules.iter().filter(|r| r.selects_type(&res.key)).collect();
        if selecting.is_empty() {
            continue;
        }
        if options.is_sensitive(&res.key) {
            // Only destinations that encrypt ever see a sensitive type; without one it is not watched.
            selecting.retain(|r| {
                selection
                    .destination(&r.destination)
                    .is_some_and(|d| d.encryption.is_some())
            });
            if selecting.is_empty() {
                out.skipped.push((res.key.clone(), SkipReason::Secret));
                continue;
            }
        }
        selected.push((res, selecting));
    }
    // Deterministic cap: desired-state types first, then by group and resource.
    selected.sort_by_key(|(res, _)| {
        (
            !in_desired_state_preset(&res.key),
            res.key.group.clone(),
            res.key.resource.clone(),
        )
    });
    if selected.len() > options.max_gvks {
        for (res, _) in selected.drain(options.max_gvks..) {
            out.skipped.push((res.key.clone(), SkipReason::Capped));
        }
    }

    for (res, selecting) in selected {
        let namespaces: BTreeSet<&str> = selecting
            .iter()
            .filter_map(|r| match &r.kind {
                crate::rules::compiled::RuleKind::Namespaced { namespace, .. } => {
                    Some(namespace.as_str())
                }
                _ => None,
            })
            .collect();
        // Above the threshold one cluster-wide watch replaces the namespaced ones, unless its list was forbidden.
        let too_many = namespaces.len() > options.max_namespaced_watches_per_type
            && !cluster_list_forbidden.contains(&res.group_resource());
        let cluster_wide =
            !res.key.namespaced || too_many || selecting.iter().any(|r| r.needs_all_namespaces());
        // Group the rules by watch namespace.
        let mut by_watch: BTreeMap<String, Vec<&CompiledRule>> = BTreeMap::new();
        for rule in selecting {
            let watch_ns = match (&rule.kind, cluster_wide) {
                (crate::rules::compiled::RuleKind::Namespaced { namespace, .. }, false) => {
                    namespace.clone()
                }
                _ => String::new(),
            };
            by_watch.entry(watch_ns).or_default().push(rule);
        }
        for (namespace, rules) in by_watch {
            let key = WatchKey {
                group: res.key.group.clone(),
                version: res.key.version.clone(),
                resource: res.key.resource.clone(),
                namespace,
            };
            let uses_labels = rules.iter().any(|r| r.uses_namespace_labels());
            let mut routes: BTreeMap<String, DestinationRoute> = BTreeMap::new();
            for rule in rules {
                let Some(decl) = selection.destination(&rule.destination) else {
                    continue;
                };
                let route =
                    routes
                        .entry(rule.destination.clone())
                        .or_insert_with(|| DestinationRoute {
                            destination: decl.clone(),
                            rules: Vec::new(),
                            snapshot_namespaces: BTreeSet::new(),
                        });
                route.rules.push(rule.clone());
                route
                    .snapshot_namespaces
                    .extend(rule.snapshot_namespaces(&res.key, &selection.namespace_labels));
            }
            for route in routes.values_mut() {
                if route.snapshot_namespaces.contains("") {
                    route.snapshot_namespaces.retain(String::is_empty);
                }
            }
            out.plans.insert(
                key.clone(),
                WatchPlan {
                    key,
                    resource: res.clone(),
                    routes: routes.into_values().collect(),
                    namespace_labels: if uses_labels {
                        selection.namespace_labels.clone()
                    } else {
                        NamespaceLabels::new()
                    },
                    sensitive: options.is_sensitive(&res.key),
                },
            );
        }
    }
    out
}

/// Logs the skipped types once per planning round, at a level matching their importance.
pub fn log_skipped(skipped: &[(ResourceKey, SkipReason)]) {
    for (key, reason) in skipped {
        match reason {
            SkipReason::Secret => info!(
                group = %key.group, resource = %key.resource,
                "not watching a sensitive type: no destination selecting it has encryption configured, and it never goes to Git in plaintext"
            ),
            SkipReason::Capped => warn!(
                group = %key.group, resource = %key.resource,
                "not watching: over the maxGVKs cap"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ResourceScope;
    use crate::rules::compiled::test_support::*;

    fn cluster() -> Vec<DiscoveredResource> {
        vec![
            DiscoveredResource::new("", "v1", "pods", "Pod", true),
            DiscoveredResource::new("", "v1", "events", "Event", true),
            DiscoveredResource::new("", "v1", "configmaps", "ConfigMap", true),
            DiscoveredResource::new("", "v1", "secrets", "Secret", true),
            DiscoveredResource::new("", "v1", "services", "Service", true),
            DiscoveredResource::new("", "v1", "namespaces", "Namespace", false),
            DiscoveredResource::new("apps", "v1", "deployments", "Deployment", true),
            DiscoveredResource::new("batch", "v1", "jobs", "Job", true),
            DiscoveredResource::new(
                "rbac.authorization.k8s.io",
                "v1",
                "clusterroles",
                "ClusterRole",
                false,
            ),
            DiscoveredResource::new("example.com", "v1", "widgets", "Widget", true),
        ]
    }

    fn selection(rules: Vec<CompiledRule>) -> Selection {
        let mut dests: Vec<_> = rules.iter().map(|r| decl(&r.destination)).collect();
        dests.dedup();
        Selection {
            destinations: dests,
            rules,
            namespace_labels: NamespaceLabels::new(),
            reconcile_requests: Default::default(),
        }
    }

    fn types(d: &DesiredWatches) -> Vec<String> {
        let mut out: Vec<String> = d.plans.keys().map(|k| k.to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn preset_rule_watches_desired_state_types_but_not_pods_events_jobs_or_secrets() {
        let sel = selection(vec![cluster_rule(
            "x/prod",
            ResourceScope::Namespaced,
            &[],
            None,
        )]);
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        assert_eq!(
            types(&d),
            vec![
                "apps/v1/deployments",
                "core/v1/configmaps",
                "core/v1/services"
            ]
        );
        assert_eq!(
            d.skipped,
            vec![(
                ResourceKey::new("", "v1", "secrets", true),
                SkipReason::Secret
            )]
        );
    }

    #[test]
    fn wildcard_rule_still_applies_default_exclusions() {
        let sel = selection(vec![
            cluster_rule("x/prod", ResourceScope::Namespaced, &["*"], None),
            cluster_rule("x/prod", ResourceScope::Cluster, &["*"], None),
        ]);
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        assert_eq!(
            types(&d),
            vec![
                "apps/v1/deployments",
                "core/v1/configmaps",
                "core/v1/namespaces",
                "core/v1/services",
                "example.com/v1/widgets",
                "rbac.authorization.k8s.io/v1/clusterroles",
            ]
        );
    }

    #[test]
    fn watch_all_widens_preset_rules_minus_discovery_excludes() {
        let sel = selection(vec![cluster_rule(
            "x/prod",
            ResourceScope::Namespaced,
            &[],
            None,
        )]);
        let opts = DiscoveryOptions {
            watch_all: true,
            exclude: vec!["widgets.example.com".into(), "services".into()],
            ..Default::default()
        };
        let d = desired_watches(&cluster(), &sel, &opts);
        assert_eq!(types(&d), vec!["apps/v1/deployments", "core/v1/configmaps"]);
    }

    #[test]
    fn watch_rules_alone_get_one_namespaced_watch_per_namespace() {
        let sel = selection(vec![
            watch_rule("shop", "shop/prod", &["configmaps"], None),
            watch_rule("shop", "shop/audit", &["configmaps"], None),
            watch_rule("web", "web/prod", &["configmaps"], None),
        ]);
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        assert_eq!(
            types(&d),
            vec!["core/v1/configmaps in shop", "core/v1/configmaps in web"]
        );
        let shop = d.plans.values().next().unwrap();
        let dests: Vec<_> = shop
            .routes
            .iter()
            .map(|r| r.destination.key.as_str())
            .collect();
        assert_eq!(dests, vec!["shop/audit", "shop/prod"]);
    }

    #[test]
    fn a_cluster_rule_makes_one_shared_cluster_wide_watch_with_narrow_snapshot_scopes() {
        let sel = selection(vec![
            watch_rule("shop", "shop/prod", &["configmaps"], None),
            cluster_rule("x/all", ResourceScope::Namespaced, &["configmaps"], None),
        ]);
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        assert_eq!(types(&d), vec!["core/v1/configmaps"]);
        let plan = d.plans.values().next().unwrap();
        let scopes: Vec<(&str, Vec<&str>)> = plan
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.key.as_str(),
                    r.snapshot_namespaces.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            scopes,
            vec![("shop/prod", vec!["shop"]), ("x/all", vec![""])]
        );
    }

    /// `WatchRule`s for configmaps in `ns-0`..`ns-{n-1}`, alternating between two destinations.
    fn namespaced_rules(n: usize) -> Selection {
        let mut sel = selection(
            (0..n)
                .map(|i| {
                    let dest = if i % 2 == 0 { "a/prod" } else { "b/prod" };
                    watch_rule(&format!("ns-{i}"), dest, &["configmaps"], None)
                })
                .collect(),
        );
        sel.destinations.sort_by(|a, b| a.key.cmp(&b.key));
        sel.destinations.dedup_by(|a, b| a.key == b.key);
        sel
    }

    fn threshold(max: usize) -> DiscoveryOptions {
        DiscoveryOptions {
            max_namespaced_watches_per_type: max,
            ..Default::default()
        }
    }

    #[test]
    fn watch_rules_up_to_the_threshold_keep_one_watch_per_namespace() {
        let d = desired_watches(&cluster(), &namespaced_rules(4), &threshold(4));
        assert_eq!(d.plans.len(), 4, "{:?}", types(&d));
        assert!(d.plans.keys().all(|k| !k.namespace.is_empty()));
        assert!(d.plans.values().all(|p| !p.merges_namespaces()));
    }

    #[test]
    fn watch_rules_above_the_threshold_share_one_cluster_wide_watch_with_their_own_scopes() {
        let d = desired_watches(&cluster(), &namespaced_rules(5), &threshold(4));
        assert_eq!(types(&d), vec!["core/v1/configmaps"]);
        let plan = d.plans.values().next().unwrap();
        assert!(plan.merges_namespaces());
        let scopes: Vec<(&str, Vec<&str>)> = plan
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.key.as_str(),
                    r.snapshot_namespaces.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        // Snapshots open and close exactly the rules' namespaces, never "" (all): sweeps stay scoped.
        assert_eq!(
            scopes,
            vec![
                ("a/prod", vec!["ns-0", "ns-2", "ns-4"]),
                ("b/prod", vec!["ns-1", "ns-3"])
            ]
        );
        assert_eq!(
            plan.covered_namespaces(),
            Some(BTreeSet::from(["ns-0", "ns-1", "ns-2", "ns-3", "ns-4"]))
        );
        // Zero: always one cluster-wide watch.
        let d = desired_watches(&cluster(), &namespaced_rules(1), &threshold(0));
        assert_eq!(types(&d), vec!["core/v1/configmaps"]);
    }

    #[test]
    fn a_forbidden_cluster_wide_list_falls_back_to_one_watch_per_namespace() {
        let forbidden = BTreeSet::from([(String::new(), "configmaps".to_owned())]);
        let d = desired_watches_with(&cluster(), &namespaced_rules(5), &threshold(4), &forbidden);
        assert_eq!(d.plans.len(), 5, "{:?}", types(&d));
        for (key, plan) in &d.plans {
            assert!(!plan.merges_namespaces());
            let scopes: Vec<&BTreeSet<String>> =
                plan.routes.iter().map(|r| &r.snapshot_namespaces).collect();
            assert_eq!(scopes, vec![&BTreeSet::from([key.namespace.clone()])]);
        }
        // Another type is not affected.
        let other = BTreeSet::from([(String::new(), "services".to_owned())]);
        let d = desired_watches_with(&cluster(), &namespaced_rules(5), &threshold(4), &other);
        assert_eq!(types(&d), vec!["core/v1/configmaps"]);
    }

    #[test]
    fn a_cluster_rule_watch_never_counts_as_merged_namespaces() {
        let mut sel = namespaced_rules(5);
        sel.rules.push(cluster_rule(
            "a/prod",
            ResourceScope::Namespaced,
            &["configmaps"],
            None,
        ));
        let d = desired_watches(&cluster(), &sel, &threshold(4));
        let plan = d.plans.values().next().unwrap();
        assert_eq!(types(&d), vec!["core/v1/configmaps"]);
        assert!(!plan.merges_namespaces());
        assert_eq!(plan.covered_namespaces(), None);
    }

    #[test]
    fn rules_without_a_declared_destination_watch_nothing() {
        let mut sel = selection(vec![watch_rule("shop", "shop/prod", &["configmaps"], None)]);
        sel.destinations.clear();
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        assert!(d.plans.is_empty());
    }

    #[test]
    fn caps_watched_types_keeping_desired_state_types_first() {
        let mut discovered = cluster();
        for i in 0..5 {
            discovered.push(DiscoveredResource::new(
                "aaa.example.com",
                "v1",
                &format!("things{i}"),
                "Thing",
                true,
            ));
        }
        let sel = selection(vec![cluster_rule(
            "x/prod",
            ResourceScope::Namespaced,
            &["*"],
            None,
        )]);
        let opts = DiscoveryOptions {
            max_gvks: 3,
            ..Default::default()
        };
        let d = desired_watches(&discovered, &sel, &opts);
        assert_eq!(
            types(&d),
            vec![
                "apps/v1/deployments",
                "core/v1/configmaps",
                "core/v1/services"
            ]
        );
        let capped = d
            .skipped
            .iter()
            .filter(|(_, r)| *r == SkipReason::Capped)
            .count();
        assert_eq!(capped, 6, "5 things + widgets");
    }

    #[test]
    fn plans_carry_namespace_labels_only_when_a_selector_needs_them() {
        let mut sel = selection(vec![
            cluster_rule(
                "x/prod",
                ResourceScope::Namespaced,
                &["configmaps"],
                Some(match_labels(&[("team", "a")])),
            ),
            cluster_rule("x/prod", ResourceScope::Namespaced, &["services"], None),
        ]);
        sel.namespace_labels
            .insert("a1".into(), labels(&[("team", "a")]));
        let d = desired_watches(&cluster(), &sel, &DiscoveryOptions::default());
        let cm = &d.plans[&WatchKey {
            group: "".into(),
            version: "v1".into(),
            resource: "configmaps".into(),
            namespace: "".into(),
        }];
        assert_eq!(cm.namespace_labels.len(), 1);
        assert_eq!(
            cm.routes[0].snapshot_namespaces,
            BTreeSet::from(["a1".to_owned()])
        );
        let svc = &d.plans[&WatchKey {
            group: "".into(),
            version: "v1".into(),
            resource: "services".into(),
            namespace: "".into(),
        }];
        assert!(svc.namespace_labels.is_empty());
    }
}
