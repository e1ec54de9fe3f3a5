//! The resource registry: which group/version/resource triples are served, their kind,
//! scope, verbs and short names. Built-ins come from k8s-openapi's metadata; CRDs add and
//! remove entries at run time.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use serde_json::Value;

/// One served `group/version/resource`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// PUT/PATCH on the main resource keep the stored status; `/status` writes only status.
    pub status_subresource: bool,
    /// Served from a CustomResourceDefinition (affects delete responses, list items, patch types).
    pub custom: bool,
    /// Only create is served (e.g. `selfsubjectreviews`).
    pub create_only: bool,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            return vec!["create"];
        }
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    /// Built-ins without a status subresource (ConfigMap, Secret, Lease ...) carry no
    /// `metadata.generation` on a real server either.
    pub fn tracks_generation(&self) -> bool {
        self.custom || self.status_subresource
    }
}

trait Scope {
    const NAMESPACED: bool;
}
impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

fn builtin<R>(short: &[&str], categories: &[&str], status: bool) -> ResourceDef
where
    R: k8s_openapi::Resource,
    R::Scope: Scope,
{
    ResourceDef {
        group: R::GROUP.to_string(),
        version: R::VERSION.to_string(),
        kind: R::KIND.to_string(),
        plural: R::URL_PATH_SEGMENT.to_string(),
        singular: R::KIND.to_lowercase(),
        namespaced: <R::Scope as Scope>::NAMESPACED,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        status_subresource: status,
        custom: false,
        create_only: false,
    }
}

/// The built-in resources served from the start.
pub fn builtins() -> Vec<ResourceDef> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, authentication::v1 as authn,
        autoscaling::v2 as hpa, batch::v1 as batch, coordination::v1 as coord, core::v1 as core,
        discovery::v1 as disc, events::v1 as events, networking::v1 as net, policy::v1 as policy,
        rbac::v1 as rbac, scheduling::v1 as sched, storage::v1 as storage,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
    const ALL: &[&str] = &["all"];
    let mut defs = vec![
        builtin::<core::ConfigMap>(&["cm"], &[], false),
        builtin::<core::Secret>(&[], &[], false),
        builtin::<core::Namespace>(&["ns"], &[], true),
        builtin::<core::Pod>(&["po"], ALL, true),
        builtin::<core::Service>(&["svc"], ALL, true),
        builtin::<core::ServiceAccount>(&["sa"], &[], false),
        builtin::<core::Endpoints>(&["ep"], &[], false),
        builtin::<core::Event>(&["ev"], &[], false),
        builtin::<core::Node>(&["no"], &[], true),
        builtin::<core::PersistentVolume>(&["pv"], &[], true),
        builtin::<core::PersistentVolumeClaim>(&["pvc"], &[], true),
        builtin::<core::ReplicationController>(&["rc"], ALL, true),
        builtin::<core::LimitRange>(&["limits"], &[], false),
        builtin::<core::ResourceQuota>(&["quota"], &[], true),
        builtin::<apps::Deployment>(&["deploy"], ALL, true),
        builtin::<apps::StatefulSet>(&["sts"], ALL, true),
        builtin::<apps::DaemonSet>(&["ds"], ALL, true),
        builtin::<apps::ReplicaSet>(&["rs"], ALL, true),
        builtin::<apps::ControllerRevision>(&[], &[], false),
        builtin::<batch::Job>(&[], ALL, true),
        builtin::<batch::CronJob>(&["cj"], ALL, true),
        builtin::<coord::Lease>(&[], &[], false),
        builtin::<rbac::Role>(&[], &[], false),
        builtin::<rbac::RoleBinding>(&[], &[], false),
        builtin::<rbac::ClusterRole>(&[], &[], false),
        builtin::<rbac::ClusterRoleBinding>(&[], &[], false),
        builtin::<net::Ingress>(&["ing"], &[], true),
        builtin::<net::IngressClass>(&[], &[], false),
        builtin::<net::NetworkPolicy>(&["netpol"], &[], false),
        builtin::<policy::PodDisruptionBudget>(&["pdb"], &[], true),
        builtin::<hpa::HorizontalPodAutoscaler>(&["hpa"], ALL, true),
        builtin::<apiext::CustomResourceDefinition>(&["crd", "crds"], &["api-extensions"], true),
        builtin::<adm::ValidatingWebhookConfiguration>(&[], &["api-extensions"], false),
        builtin::<adm::MutatingWebhookConfiguration>(&[], &["api-extensions"], false),
        builtin::<storage::StorageClass>(&["sc"], &[], false),
        builtin::<sched::PriorityClass>(&["pc"], &[], false),
        builtin::<events::Event>(&["ev"], &[], false),
        builtin::<disc::EndpointSlice>(&[], &[], false),
    ];
    let mut review = builtin::<authn::SelfSubjectReview>(&[], &[], false);
    review.create_only = true;
    defs.push(review);
    defs
}

/// Served resources, indexed for URL routing and discovery.
#[derive(Debug, Clone)]
pub struct Registry {
    /// (group, version, plural) → definition.
    by_gvr: BTreeMap<(String, String, String), Arc<ResourceDef>>,
    /// Group → versions in preference order (first is preferred).
    versions: BTreeMap<String, Vec<String>>,
    /// Group order as discovery lists it: built-ins in registration order, then CRD groups.
    group_order: Vec<String>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry {
            by_gvr: BTreeMap::new(),
            versions: BTreeMap::new(),
            group_order: Vec::new(),
        };
        for def in builtins() {
            r.insert(def);
        }
        r
    }
}

impl Registry {
    pub fn insert(&mut self, def: ResourceDef) {
        if !self.group_order.contains(&def.group) {
            self.group_order.push(def.group.clone());
        }
        let versions = self.versions.entry(def.group.clone()).or_default();
        if !versions.contains(&def.version) {
            versions.push(def.version.clone());
        }
        self.by_gvr.insert(
            (def.group.clone(), def.version.clone(), def.plural.clone()),
            Arc::new(def),
        );
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.by_gvr
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Looks a resource up by kind, as manifests name it (`apps/v1` + `Deployment`).
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceDef>> {
        let (group, version) = split_api_version(api_version);
        self.by_gvr
            .values()
            .find(|d| d.group == group && d.version == version && d.kind == kind)
            .cloned()
    }

    pub fn groups(&self) -> impl Iterator<Item = &String> {
        self.group_order
            .iter()
            .filter(|g| self.versions.contains_key(*g))
    }

    pub fn group_versions(&self, group: &str) -> &[String] {
        self.versions.get(group).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn resources(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        self.by_gvr
            .values()
            .filter(|d| d.group == group && d.version == version)
            .cloned()
            .collect()
    }

    /// Drops every version of `group/plural` (a CRD was deleted or renamed).
    pub fn remove(&mut self, group: &str, plural: &str) {
        self.by_gvr
            .retain(|(g, _, p), _| !(g == group && p == plural));
        let remaining: Vec<String> = self
            .by_gvr
            .keys()
            .filter(|(g, _, _)| g == group)
            .map(|(_, v, _)| v.clone())
            .collect();
        if let Some(vs) = self.versions.get_mut(group) {
            vs.retain(|v| remaining.contains(v));
            if vs.is_empty() {
                self.versions.remove(group);
                self.group_order.retain(|g| g != group);
            }
        }
    }
}

pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// The resources a CRD serves, or why it is not acceptable (422 field and message).
pub fn defs_from_crd(crd: &Value) -> Result<Vec<ResourceDef>, (String, String)> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default();
    let kind = names["kind"].as_str().unwrap_or_default();
    if group.is_empty() {
        return Err(("spec.group".into(), "Required value".into()));
    }
    if plural.is_empty() {
        return Err(("spec.names.plural".into(), "Required value".into()));
    }
    if kind.is_empty() {
        return Err(("spec.names.kind".into(), "Required value".into()));
    }
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        return Err((
            "metadata.name".into(),
            format!("Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})"),
        ));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => {
            return Err((
                "spec.scope".into(),
                "Unsupported value: supported values: \"Cluster\", \"Namespaced\"".into(),
            ));
        }
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(("spec.versions".into(), "Required value".into()));
    }
    let mut defs = Vec::new();
    for v in &versions {
        if v["served"].as_bool() == Some(false) {
            continue;
        }
        let Some(name) = v["name"].as_str() else {
            return Err(("spec.versions[].name".into(), "Required value".into()));
        };
        defs.push(ResourceDef {
            group: group.to_string(),
            version: name.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: names["singular"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| kind.to_lowercase()),
            namespaced,
            short_names: strings(&names["shortNames"]),
            categories: strings(&names["categories"]),
            status_subresource: v["subresources"].get("status").is_some(),
            custom: true,
            create_only: false,
        });
    }
    // Preferred (storage) version first, like discovery orders them.
    defs.sort_by_key(|d| {
        let storage = versions
            .iter()
            .any(|v| v["name"] == d.version.as_str() && v["storage"].as_bool() == Some(true));
        !storage
    });
    Ok(defs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builtins_carry_k8s_openapi_metadata() {
        let r = Registry::default();
        let cm = r.get("", "v1", "configmaps").expect("configmaps served");
        assert_eq!(cm.kind, "ConfigMap");
        assert!(cm.namespaced);
        let lease = r
            .get("coordination.k8s.io", "v1", "leases")
            .expect("leases served");
        assert_eq!(lease.kind, "Lease");
        let crd = r
            .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .expect("crds served");
        assert!(!crd.namespaced);
        assert_eq!(
            r.by_kind("apps/v1", "Deployment").map(|d| d.plural.clone()),
            Some("deployments".into())
        );
    }

    #[test]
    fn crd_versions_become_resources_and_disappear_on_removal() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": false},
                    {"name": "v2", "served": true, "storage": true, "subresources": {"status": {}}}
                ]
            }
        });
        let defs = defs_from_crd(&crd).expect("valid crd");
        assert_eq!(defs[0].version, "v2", "storage version is preferred");
        let mut r = Registry::default();
        for d in defs {
            r.insert(d);
        }
        assert!(
            r.get("example.com", "v2", "widgets")
                .is_some_and(|d| d.status_subresource)
        );
        r.remove("example.com", "widgets");
        assert!(r.get("example.com", "v1", "widgets").is_none());
        assert!(!r.groups().any(|g| g == "example.com"));
    }

    #[test]
    fn crd_name_must_be_plural_dot_group() {
        let crd = json!({
            "metadata": {"name": "wrong"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"plural": "widgets", "kind": "Widget"},
                     "versions": [{"name": "v1", "served": true, "storage": true}]}
        });
        assert_eq!(defs_from_crd(&crd).unwrap_err().0, "metadata.name");
    }
}
