//! Sanitizing live objects and rendering them as canonical YAML.
//!
//! The same object must always produce the same bytes, whether it arrives in the
//! initial List or in a later Watch event, so that an unchanged object never
//! produces a Git diff. Two steps get us there:
//!
//! 1. [`sanitize`] drops what the cluster owns rather than the user: `status`,
//!    server-managed metadata, tool bookkeeping annotations/labels, allocated
//!    Service IPs, a PVC's bound volume and `creationTimestamp: null` inside
//!    embedded templates.
//! 2. [`render`] writes one YAML document with serde-saphyr: `apiVersion`,
//!    `kind`, `metadata` first, every other key (at every depth) sorted; LF line
//!    endings, no `---` header, a trailing newline. serde-saphyr quotes strings
//!    that a YAML 1.1 reader (go-yaml v2 in kubectl/Flux/Argo CD, PyYAML) would
//!    otherwise read back as booleans, numbers or null (`on`, `no`, `"010"`, `~`).
//!
//! [`to_canonical_yaml`] does both; [`content_hash`] fingerprints the result.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Metadata fields written by the API server, never by the user.
const DROPPED_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
    "ownerReferences",
];

/// Annotation prefixes owned by kubectl, controllers and GitOps tools.
const DROPPED_ANNOTATION_PREFIXES: &[&str] = &[
    "kubectl.kubernetes.io/",
    "deployment.kubernetes.io/",
    "control-plane.alpha.kubernetes.io/",
    "autoscaling.alpha.kubernetes.io/",
    "kustomize.toolkit.fluxcd.io/",
];

/// Single annotations written by Argo CD for its own tracking. Other
/// `argocd.argoproj.io/` keys (e.g. `sync-wave`) are user intent and stay.
const DROPPED_ANNOTATION_KEYS: &[&str] = &[
    "argocd.argoproj.io/tracking-id",
    "argocd.argoproj.io/installation-id",
];

const DROPPED_LABEL_PREFIXES: &[&str] = &["kustomize.toolkit.fluxcd.io/"];

/// Finalizers the API server adds when an owner is deleted with `propagationPolicy: Foreground` or `Orphan`, for
/// the garbage collector: a deletion in progress, not something the user asked the object to carry.
const DROPPED_FINALIZERS: &[&str] = &["foregroundDeletion", "orphan"];

/// Service fields the cluster allocates or defaults per cluster; keeping them
/// would make a manifest unportable and churn on re-creation.
const DROPPED_SERVICE_SPEC: &[&str] = &[
    "clusterIP",
    "clusterIPs",
    "ipFamilies",
    "ipFamilyPolicy",
    "internalTrafficPolicy",
    "healthCheckNodePort",
];

/// Errors from rendering or parsing canonical YAML.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// Only JSON objects are Kubernetes objects.
    #[error("expected a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("rendering YAML: {0}")]
    Render(#[from] serde_saphyr::SerializeError),
    #[error("parsing YAML: {0}")]
    Parse(#[from] serde_saphyr::Error),
}

/// Returns a copy of `obj` without the fields the cluster owns (see the module
/// docs). Non-object input is returned unchanged.
pub fn sanitize(obj: &Value) -> Value {
    let mut out = obj.clone();
    let Some(root) = out.as_object_mut() else {
        return out;
    };
    root.remove("status");

    let api_version = root.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = root.get("kind").and_then(Value::as_str).unwrap_or("");
    // Only core/v1 kinds: a CRD may reuse the kind name with another meaning.
    match (api_version, kind) {
        ("v1", "Service") => sanitize_service_spec(root),
        ("v1", "PersistentVolumeClaim") => {
            if let Some(spec) = root.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("volumeName");
            }
        }
        _ => {}
    }

    if let Some(meta) = root.get_mut("metadata").and_then(Value::as_object_mut) {
        sanitize_metadata(meta);
    }
    drop_null_creation_timestamps(&mut out);
    out
}

fn sanitize_service_spec(root: &mut Map<String, Value>) {
    let Some(spec) = root.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    // `clusterIP: None` makes a headless Service: that is a user choice, not an
    // allocation, and dropping it would turn the Service into a normal one when
    // applied from Git.
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    for field in DROPPED_SERVICE_SPEC {
        if headless && *field == "clusterIP" {
            continue;
        }
        spec.remove(*field);
    }
}

fn sanitize_metadata(meta: &mut Map<String, Value>) {
    for field in DROPPED_METADATA {
        meta.remove(*field);
    }
    retain_entries(meta, "annotations", |key| {
        !DROPPED_ANNOTATION_PREFIXES
            .iter()
            .any(|p| key.starts_with(p))
            && !DROPPED_ANNOTATION_KEYS.contains(&key)
    });
    retain_entries(meta, "labels", |key| {
        !DROPPED_LABEL_PREFIXES.iter().any(|p| key.starts_with(p))
    });
    if let Some(Value::Array(finalizers)) = meta.get_mut("finalizers") {
        finalizers.retain(|f| !f.as_str().is_some_and(|f| DROPPED_FINALIZERS.contains(&f)));
        if finalizers.is_empty() {
            meta.remove("finalizers");
        }
    }
}

/// Filters the string map `meta[field]` and removes it when nothing is left, so
/// that dropping the last tool annotation does not leave `annotations: {}`.
fn retain_entries(meta: &mut Map<String, Value>, field: &str, keep: impl Fn(&str) -> bool) {
    let now_empty = match meta.get_mut(field) {
        Some(Value::Object(entries)) => {
            entries.retain(|k, _| keep(k));
            entries.is_empty()
        }
        Some(Value::Null) => true,
        _ => false,
    };
    if now_empty {
        meta.remove(field);
    }
}

/// Client-side serialization of Go structs writes `creationTimestamp: null` into
/// every embedded `metadata` (pod templates, job templates, volume claim
/// templates); it carries no information.
fn drop_null_creation_timestamps(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Object(meta)) = map.get_mut("metadata")
                && meta.get("creationTimestamp") == Some(&Value::Null)
            {
                meta.remove("creationTimestamp");
            }
            map.values_mut().for_each(drop_null_creation_timestamps);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null_creation_timestamps),
        _ => {}
    }
}

/// Sanitizes `obj` and renders it as canonical YAML.
pub fn to_canonical_yaml(obj: &Value) -> Result<String, CanonicalError> {
    render(&sanitize(obj))
}

/// Renders `obj` as canonical YAML without sanitizing it (used for objects we
/// generate ourselves, such as CRD manifests).
pub fn render(obj: &Value) -> Result<String, CanonicalError> {
    if !obj.is_object() {
        return Err(CanonicalError::NotAnObject(json_type(obj)));
    }
    let mut options = serde_saphyr::SerializerOptions::default();
    // Folding long single-line strings (`>`) would re-wrap them on every edit and
    // leave trailing spaces at fold points; keep them on one line instead.
    options.folded_wrap_chars = usize::MAX;
    let mut yaml = serde_saphyr::to_string_with_options(&Ordered::root(obj), options)?;
    if !yaml.ends_with('\n') {
        yaml.push('\n');
    }
    Ok(yaml)
}

/// Parses one YAML document into a JSON value (the inverse of [`render`]).
pub fn parse_yaml(yaml: &str) -> Result<Value, CanonicalError> {
    Ok(serde_saphyr::from_str(yaml)?)
}

/// SHA-256 of the canonical YAML bytes: equal hashes mean byte-identical files.
pub fn content_hash(canonical_yaml: &str) -> [u8; 32] {
    Sha256::digest(canonical_yaml.as_bytes()).into()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Serializes a JSON value with canonical key order. Sorting here rather than
/// relying on `serde_json::Map` keeps the order right even if some crate in the
/// build turns on serde_json's `preserve_order` feature.
struct Ordered<'a> {
    value: &'a Value,
    top_level: bool,
}

impl<'a> Ordered<'a> {
    fn root(value: &'a Value) -> Self {
        Self {
            value,
            top_level: true,
        }
    }

    fn nested(value: &'a Value) -> Self {
        Self {
            value,
            top_level: false,
        }
    }
}

/// Position of a top-level key: the Kubernetes header first, then the rest.
fn top_level_rank(key: &str) -> u8 {
    match key {
        "apiVersion" => 0,
        "kind" => 1,
        "metadata" => 2,
        _ => 3,
    }
}

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.top_level {
                    entries.sort_by_key(|(k, _)| (top_level_rank(k), *k));
                } else {
                    entries.sort_by_key(|(k, _)| *k);
                }
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    out.serialize_entry(key, &Ordered::nested(value))?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(&Ordered::nested(item))?;
                }
                out.end()
            }
            Value::String(s) if has_line_end_whitespace(s) => {
                // A literal block would keep these spaces as invisible line ends,
                // which editors and `git diff --check` strip or flag; quoting keeps
                // them visible and safe.
                serde_saphyr::DoubleQuoted(s.as_str()).serialize(serializer)
            }
            other => other.serialize(serializer),
        }
    }
}

/// True for multi-line strings where some line ends in a space or tab.
fn has_line_end_whitespace(s: &str) -> bool {
    s.contains('\n') && s.split('\n').any(|line| line.ends_with([' ', '\t']))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drops_status_and_server_metadata() {
        let obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "1",
                "generation": 2, "creationTimestamp": "2020-01-01T00:00:00Z",
                "deletionTimestamp": "2020-01-01T00:00:00Z", "deletionGracePeriodSeconds": 30,
                "selfLink": "/x", "managedFields": [], "ownerReferences": [],
                "finalizers": ["keep/me"]
            },
            "status": {"phase": "x"},
            "data": {"k": "v"}
        });
        assert_eq!(
            sanitize(&obj),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "a", "namespace": "ns", "finalizers": ["keep/me"]},
                "data": {"k": "v"}
            })
        );
    }

    #[test]
    fn drops_the_garbage_collectors_deletion_finalizers_but_keeps_the_others() {
        let deleting = |finalizers: Value| {
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "a", "finalizers": finalizers},
                "spec": {"replicas": 1}
            })
        };
        // Foreground or orphan deletion of an owner: the file must not change while its dependents go.
        for gc in ["foregroundDeletion", "orphan"] {
            assert_eq!(
                to_canonical_yaml(&deleting(json!([gc]))).unwrap(),
                to_canonical_yaml(&json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "a"}, "spec": {"replicas": 1}
                }))
                .unwrap(),
                "{gc}"
            );
        }
        assert_eq!(
            sanitize(&deleting(json!(["foregroundDeletion", "example.com/keep"])))["metadata"]["finalizers"],
            json!(["example.com/keep"])
        );
    }

    #[test]
    fn drops_tool_annotations_and_labels_but_keeps_user_intent() {
        let obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "a",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "deployment.kubernetes.io/revision": "3",
                    "control-plane.alpha.kubernetes.io/leader": "x",
                    "autoscaling.alpha.kubernetes.io/conditions": "x",
                    "kustomize.toolkit.fluxcd.io/checksum": "x",
                    "argocd.argoproj.io/tracking-id": "x",
                    "argocd.argoproj.io/installation-id": "x",
                    "argocd.argoproj.io/sync-wave": "2",
                    "example.com/note": "hi"
                },
                "labels": {
                    "kustomize.toolkit.fluxcd.io/name": "x",
                    "app.kubernetes.io/instance": "shop"
                }
            }
        });
        assert_eq!(
            sanitize(&obj)["metadata"],
            json!({
                "name": "a",
                "annotations": {"argocd.argoproj.io/sync-wave": "2", "example.com/note": "hi"},
                "labels": {"app.kubernetes.io/instance": "shop"}
            })
        );
    }

    #[test]
    fn removes_annotation_and_label_maps_left_empty() {
        let obj = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "a",
                "annotations": {"kubectl.kubernetes.io/restartedAt": "x"},
                "labels": {"kustomize.toolkit.fluxcd.io/namespace": "x"}
            }
        });
        assert_eq!(sanitize(&obj)["metadata"], json!({"name": "a"}));
    }

    #[test]
    fn drops_service_cluster_ip_and_allocated_fields() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {
                "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                "healthCheckNodePort": 31000, "ports": [{"port": 80}], "type": "ClusterIP"
            }
        });
        assert_eq!(
            sanitize(&obj)["spec"],
            json!({"ports": [{"port": 80}], "type": "ClusterIP"})
        );
    }

    #[test]
    fn keeps_headless_service_cluster_ip_none() {
        let obj = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
        });
        assert_eq!(sanitize(&obj)["spec"], json!({"clusterIP": "None"}));
    }

    #[test]
    fn keeps_cluster_ip_on_non_core_kinds_named_service() {
        let obj = json!({
            "apiVersion": "example.com/v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"clusterIP": "10.0.0.1"}
        });
        assert_eq!(sanitize(&obj)["spec"], json!({"clusterIP": "10.0.0.1"}));
    }

    #[test]
    fn drops_pvc_volume_name() {
        let obj = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "c"},
            "spec": {"volumeName": "pvc-123", "storageClassName": "fast"}
        });
        assert_eq!(sanitize(&obj)["spec"], json!({"storageClassName": "fast"}));
    }

    #[test]
    fn drops_null_creation_timestamp_in_nested_templates() {
        let obj = json!({
            "apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {
                "metadata": {"creationTimestamp": null},
                "spec": {"template": {
                    "metadata": {"creationTimestamp": null, "labels": {"a": "b"}},
                    "spec": {}
                }}
            }}
        });
        assert_eq!(
            sanitize(&obj)["spec"],
            json!({"jobTemplate": {
                "metadata": {},
                "spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": {}}}
            }})
        );
    }

    #[test]
    fn keeps_non_null_nested_creation_timestamp() {
        // Only the null placeholder is noise; a real value inside data is content.
        let obj = json!({
            "apiVersion": "example.com/v1", "kind": "Snapshot", "metadata": {"name": "s"},
            "spec": {"copy": {"metadata": {"creationTimestamp": "2020-01-01T00:00:00Z"}}}
        });
        assert_eq!(sanitize(&obj)["spec"], obj["spec"]);
    }

    #[test]
    fn renders_header_keys_first_then_sorted() {
        let obj = json!({
            "spec": {"b": 1, "a": 2}, "kind": "X", "data": {}, "metadata": {"name": "web"},
            "apiVersion": "v1", "zeta": [], "alpha": true
        });
        assert_eq!(
            render(&obj).unwrap(),
            "apiVersion: v1\nkind: X\nmetadata:\n  name: web\nalpha: true\ndata: {}\nspec:\n  a: 2\n  b: 1\nzeta: []\n"
        );
    }

    #[test]
    fn renders_single_document_with_lf_and_trailing_newline() {
        let yaml = to_canonical_yaml(&json!({"apiVersion": "v1", "kind": "X"})).unwrap();
        assert!(!yaml.starts_with("---"));
        assert!(yaml.ends_with('\n') && !yaml.ends_with("\n\n"));
        assert!(!yaml.contains('\r'));
    }

    #[test]
    fn quotes_multiline_strings_with_trailing_spaces() {
        let yaml = render(&json!({"a": "x \ny", "b": "x\ny\n"})).unwrap();
        assert_eq!(yaml, "a: \"x \\ny\"\nb: |\n  x\n  y\n");
    }

    #[test]
    fn keeps_long_lines_unfolded() {
        let long = "word ".repeat(40);
        let yaml = render(&json!({"a": long.trim_end()})).unwrap();
        assert_eq!(yaml.lines().count(), 1);
    }

    #[test]
    fn rejects_non_object_input() {
        assert!(matches!(
            to_canonical_yaml(&json!([1])),
            Err(CanonicalError::NotAnObject("an array"))
        ));
    }

    #[test]
    fn content_hash_is_sha256_of_bytes() {
        assert_eq!(
            hex::encode(content_hash("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn same_object_renders_identically_regardless_of_input_key_order() {
        let a: Value = serde_json::from_str(
            r#"{"kind":"X","apiVersion":"v1","metadata":{"name":"n","labels":{"b":"1","a":"2"}}}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"metadata":{"labels":{"a":"2","b":"1"},"name":"n"},"apiVersion":"v1","kind":"X"}"#,
        )
        .unwrap();
        assert_eq!(
            to_canonical_yaml(&a).unwrap(),
            to_canonical_yaml(&b).unwrap()
        );
    }
}
