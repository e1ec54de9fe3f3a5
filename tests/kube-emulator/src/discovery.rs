//! Discovery documents: legacy (`/api`, `/api/v1`, `/apis`, `/apis/{g}`, `/apis/{g}/{v}`) and
//! aggregated (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList` on `/api` and `/apis`), see
//! <https://kubernetes.io/docs/concepts/overview/kubernetes-api/#discovery-api>.

use serde_json::{Value, json};

use crate::faults::Faults;
use crate::resources::{Registry, ResourceDef};

pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "36",
        "gitVersion": "v1.36.0-kube-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Does `Accept` ask for aggregated discovery? Returns the version to answer with.
pub fn wants_aggregated(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        let has = |p: &str| params.contains(&p);
        if has("g=apidiscovery.k8s.io") && has("as=APIGroupDiscoveryList") {
            if has("v=v2") {
                return Some("v2");
            }
            if has("v=v2beta1") {
                return Some("v2beta1");
            }
        }
    }
    None
}

fn resource_entries(def: &ResourceDef) -> Vec<Value> {
    let mut main = json!({
        "name": def.plural,
        "singularName": def.singular,
        "namespaced": def.namespaced,
        "kind": def.kind,
        "verbs": def.verbs(),
    });
    if !def.short_names.is_empty() {
        main["shortNames"] = json!(def.short_names);
    }
    if !def.categories.is_empty() {
        main["categories"] = json!(def.categories);
    }
    let mut out = vec![main];
    if def.status_subresource {
        out.push(json!({
            "name": format!("{}/status", def.plural),
            "singularName": "",
            "namespaced": def.namespaced,
            "kind": def.kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    out
}

/// `APIResourceList` for one group version.
pub fn resource_list(reg: &Registry, group: &str, version: &str) -> Value {
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = reg
        .resources(group, version)
        .iter()
        .flat_map(|d| resource_entries(d))
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn group_entry(reg: &Registry, group: &str) -> Value {
    let versions: Vec<Value> = reg
        .group_versions(group)
        .iter()
        .map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v }))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn api_group(reg: &Registry, group: &str) -> Value {
    let mut g = group_entry(reg, group);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

pub fn api_group_list(reg: &Registry, faults: &Faults) -> Value {
    let groups: Vec<Value> = reg
        .groups()
        .filter(|g| !g.is_empty() && !faults.is_hidden(g))
        .map(|g| group_entry(reg, g))
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

fn aggregated_group(reg: &Registry, group: &str) -> Value {
    let versions: Vec<Value> = reg
        .group_versions(group)
        .iter()
        .map(|v| {
            let resources: Vec<Value> = reg
                .resources(group, v)
                .iter()
                .map(|d| {
                    let gvk = json!({ "group": d.group, "version": d.version, "kind": d.kind });
                    let mut r = json!({
                        "resource": d.plural,
                        "responseKind": gvk,
                        "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": d.singular,
                        "verbs": d.verbs(),
                    });
                    if !d.short_names.is_empty() {
                        r["shortNames"] = json!(d.short_names);
                    }
                    if !d.categories.is_empty() {
                        r["categories"] = json!(d.categories);
                    }
                    if d.status_subresource {
                        r["subresources"] = json!([{
                            "subresource": "status",
                            "responseKind": gvk,
                            "verbs": ["get", "patch", "update"],
                        }]);
                    }
                    r
                })
                .collect();
            json!({ "version": v, "resources": resources, "freshness": "Current" })
        })
        .collect();
    let mut metadata = json!({ "creationTimestamp": null });
    if !group.is_empty() {
        metadata["name"] = json!(group);
    }
    json!({ "metadata": metadata, "versions": versions })
}

/// `APIGroupDiscoveryList` for `/api` (`core == true`) or `/apis`.
pub fn aggregated(reg: &Registry, faults: &Faults, core: bool, version: &str) -> Value {
    let items: Vec<Value> = if core {
        if faults.is_hidden("") {
            vec![]
        } else {
            vec![aggregated_group(reg, "")]
        }
    } else {
        reg.groups()
            .filter(|g| !g.is_empty() && !faults.is_hidden(g))
            .map(|g| aggregated_group(reg, g))
            .collect()
    };
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_accept_header_is_recognised() {
        assert_eq!(
            wants_aggregated(
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
            ),
            Some("v2")
        );
        assert_eq!(wants_aggregated("application/json, */*"), None);
    }

    #[test]
    fn status_subresources_are_listed_in_legacy_discovery() {
        let reg = Registry::default();
        let list = resource_list(&reg, "apps", "v1");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"deployments"));
        assert!(names.contains(&"deployments/status"));
    }
}
