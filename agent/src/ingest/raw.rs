//! [`RawObject`]: a watched object kept as the JSON the API server sent.
//!
//! kube-rs's `DynamicObject` buffers every object through serde's flatten machinery and types its whole
//! `metadata` (managedFields included), and ingestion then turned it back into a `serde_json::Value`: three full
//! copies of each object. A `RawObject` parses the JSON once into the `Value` that sanitizing and rendering read,
//! plus the few metadata fields the watcher itself uses (name, namespace, uid, resourceVersion, labels,
//! annotations). Of `metadata.managedFields` (often half of an object's JSON on a real server) only each entry's
//! `manager`, `operation`, `subresource` and `time` are kept (who wrote the object, for [`crate::ignore`]); the
//! field sets are skipped while parsing, and sanitizing drops the rest.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicResourceScope, Resource};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

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

/// A JSON object into a [`Value`]; `skip` names a key whose value is not kept but summarised by
/// [`ManagedFields`]; `metadata` goes through [`Fields`] again, summarising `managedFields`.
struct Fields {
    skip: Option<&'static str>,
    nested_metadata: bool,
}

/// `managedFields` as an array of its entries' identities ([`ManagerEntry`]); anything else is dropped.
struct ManagedFields;

/// One `managedFields` entry reduced to its string `manager`, `operation`, `subresource` and `time`.
struct ManagerEntry;

const MANAGER_KEYS: [&str; 4] = ["manager", "operation", "subresource", "time"];

impl<'de> DeserializeSeed<'de> for ManagedFields {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> DeserializeSeed<'de> for ManagerEntry {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// The visitor methods of a value that is dropped unless it has the expected shape.
macro_rules! drop_other_shapes {
    () => {
        fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Value, E> {
            Ok(Value::Null)
        }
    };
}

impl<'de> Visitor<'de> for ManagedFields {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("managedFields")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = seq.next_element_seed(ManagerEntry)? {
            if !entry.is_null() {
                out.push(entry);
            }
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    drop_other_shapes!();
}

impl<'de> Visitor<'de> for ManagerEntry {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a managedFields entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if MANAGER_KEYS.contains(&key.as_str()) {
                let value = map.next_value::<Value>()?;
                if value.is_string() {
                    out.insert(key, value);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    drop_other_shapes!();
}

impl<'de> DeserializeSeed<'de> for Fields {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fields {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if Some(key.as_str()) == self.skip {
                out.insert(key, map.next_value_seed(ManagedFields)?);
            } else if self.nested_metadata && key == "metadata" {
                let metadata = map.next_value_seed(Fields {
                    skip: Some("managedFields"),
                    nested_metadata: false,
                })?;
                out.insert(key, metadata);
            } else {
                out.insert(key, map.next_value::<Value>()?);
            }
        }
        Ok(Value::Object(out))
    }

    // Anything but an object (not a Kubernetes object, or a metadata that is not a map) is kept as it is.
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Value>()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Fields {
            skip: None,
            nested_metadata: true,
        }
        .deserialize(deserializer)?;
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
        let raw: RawObject = serde_json::from_str(&sent.to_string()).unwrap();
        assert_eq!(raw.meta().name.as_deref(), Some("web"));
        assert_eq!(raw.meta().namespace.as_deref(), Some("shop"));
        assert_eq!(raw.meta().uid.as_deref(), Some("u1"));
        assert_eq!(raw.meta().resource_version.as_deref(), Some("42"));
        assert_eq!(raw.meta().labels.as_ref().unwrap()["app"], "web");
        assert_eq!(raw.meta().annotations.as_ref().unwrap()["a"], "b");
        let mut want = sent;
        want["metadata"]["managedFields"] = json!([{"manager": "kubectl"}]);
        assert_eq!(
            raw.into_value(),
            want,
            "as sent, managedFields without field sets"
        );
    }

    #[test]
    fn only_the_top_level_metadata_loses_its_managed_field_sets() {
        let sent = json!({
            "kind": "X", "metadata": {"name": "a", "managedFields": [
                {"manager": "kustomize-controller", "operation": "Apply", "time": "2026-01-01T00:00:00Z",
                 "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:k": {}}}},
                {"manager": "x", "subresource": "status", "time": 7},
                1, null, "text", [1], {"manager": ["not", "a", "string"]}
            ]},
            "spec": {"metadata": {"managedFields": [1]}, "managedFields": 2, "list": [1, "two", null, 3.5, true]}
        });
        let raw: RawObject = serde_json::from_str(&sent.to_string()).unwrap();
        let value = raw.into_value();
        assert_eq!(
            value["metadata"],
            json!({"name": "a", "managedFields": [
                {"manager": "kustomize-controller", "operation": "Apply", "time": "2026-01-01T00:00:00Z"},
                {"manager": "x", "subresource": "status"},
                {}
            ]})
        );
        assert_eq!(value["spec"], sent["spec"]);
        for odd in [
            json!(null),
            json!(3),
            json!("x"),
            json!({"a": [1]}),
            json!(true),
        ] {
            let sent = json!({"kind": "X", "metadata": {"name": "a", "managedFields": odd}});
            let raw: RawObject = serde_json::from_str(&sent.to_string()).unwrap();
            assert_eq!(
                raw.into_value()["metadata"],
                json!({"name": "a", "managedFields": null}),
                "{odd}"
            );
        }
    }

    #[test]
    fn a_metadata_that_is_not_an_object_is_kept_as_it_is() {
        let raw: RawObject = serde_json::from_str(r#"{"kind":"X","metadata":null}"#).unwrap();
        assert_eq!(raw.into_value(), json!({"kind": "X", "metadata": null}));
    }

    #[test]
    fn an_object_without_metadata_still_parses() {
        let raw: RawObject = serde_json::from_str(r#"{"kind":"X"}"#).unwrap();
        assert_eq!(raw.meta(), &ObjectMeta::default());
    }
}
