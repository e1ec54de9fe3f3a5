//! A skeletal OpenAPI v3 (`/openapi/v3`, `/openapi/v3/{api/v1|apis/g/v}`): paths and PATCH
//! operations with their `x-kubernetes-group-version-kind` and `fieldValidation` parameter,
//! no schemas. kubectl reads exactly this to decide that validation happens server-side
//! (and then does not need the protobuf-only OpenAPI v2); schemas are not emulated, so
//! `kubectl explain` does not work.

use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Map, Value, json};

use crate::resources::Registry;

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The document for one group version.
pub fn group_version(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = reg.resources(group, version);
    if defs.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    let params = json!([
        { "name": "dryRun", "in": "query", "schema": { "type": "string" } },
        { "name": "fieldManager", "in": "query", "schema": { "type": "string" } },
        { "name": "fieldValidation", "in": "query", "schema": { "type": "string" } },
        { "name": "force", "in": "query", "schema": { "type": "boolean" } },
    ]);
    for d in defs {
        let base = format!("/{}", gv_path(group, version));
        let item = if d.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", d.plural)
        } else {
            format!("{base}/{}/{{name}}", d.plural)
        };
        let gvk = json!({ "group": d.group, "version": d.version, "kind": d.kind });
        let op = json!({
            "operationId": format!("patch{}", d.kind),
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "parameters": params,
            "requestBody": { "content": {
                "application/json-patch+json": { "schema": {} },
                "application/merge-patch+json": { "schema": {} },
                "application/apply-patch+yaml": { "schema": {} },
            }},
            "responses": { "200": { "description": "OK" } },
        });
        paths.insert(item, json!({ "patch": op }));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes (kube-emulator)", "version": "v1.36.0" },
        "paths": paths,
        "components": { "schemas": {} },
    }))
}

/// The `/openapi/v3` index; each entry's hash changes when its group version's resources do.
pub fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for g in reg.groups() {
        for v in reg.group_versions(g) {
            let Some(doc) = group_version(reg, g, v) else {
                continue;
            };
            let mut h = DefaultHasher::new();
            doc.to_string().hash(&mut h);
            let p = gv_path(g, v);
            paths.insert(
                p.clone(),
                json!({ "serverRelativeURL": format!("/openapi/v3/{p}?hash={:016X}", h.finish()) }),
            );
        }
    }
    json!({ "paths": paths })
}
