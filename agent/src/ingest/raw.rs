//! [`RawObject`]: a watched object kept as the JSON the API server sent.
//!
//! kube-rs's `DynamicObject` buffers every object through serde's flatten machinery and types its whole
//! `metadata` (managedFields included), and ingestion then turned it back into a `serde_json::Value`: three full
//! copies of each object. A `RawObject` parses the JSON once into the `Value` that sanitizing and rendering read,
//! plus the few metadata fields the watcher itself uses (name, namespace, uid, resourceVersion, labels,
//! annotations).

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicResourceScope, Resource};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// One object of a watched type, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct RawObject {
    meta: ObjectMeta,
    value: Value,
}

impl RawObject {
    /// The object as received.
    pub fn into_value(self) -> Value {
        self.value
    }
}

fn string(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn string_map(value: &Value, key: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let map = value.get(key)?.as_object()?;
    Some(
        map.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
    )
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let meta = match value.get("metadata") {
            Some(m) => ObjectMeta {
                name: string(m, "name"),
                namespace: string(m, "namespace"),
                uid: string(m, "uid"),
                resource_version: string(m, "resourceVersion"),
                labels: string_map(m, "labels"),
                annotations: string_map(m, "annotations"),
                ..ObjectMeta::default()
            },
            None => ObjectMeta::default(),
        };
        Ok(RawObject { meta, value })
    }
}

impl Resource for RawObject {
    type DynamicType = ApiResource;
    type Scope = DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }

    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }

    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }

    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }

    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_the_json_as_sent_and_reads_the_watchers_metadata() {
        let sent = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "42",
                "labels": {"app": "web"}, "annotations": {"a": "b"},
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"replicas": 2, "x": null}
        });
        let raw: RawObject = serde_json::from_value(sent.clone()).unwrap();
        assert_eq!(raw.meta().name.as_deref(), Some("web"));
        assert_eq!(raw.meta().namespace.as_deref(), Some("shop"));
        assert_eq!(raw.meta().uid.as_deref(), Some("u1"));
        assert_eq!(raw.meta().resource_version.as_deref(), Some("42"));
        assert_eq!(raw.meta().labels.as_ref().unwrap()["app"], "web");
        assert_eq!(raw.meta().annotations.as_ref().unwrap()["a"], "b");
        assert_eq!(raw.into_value(), sent);
    }

    #[test]
    fn an_object_without_metadata_still_parses() {
        let raw: RawObject = serde_json::from_str(r#"{"kind":"X"}"#).unwrap();
        assert_eq!(raw.meta(), &ObjectMeta::default());
    }
}
