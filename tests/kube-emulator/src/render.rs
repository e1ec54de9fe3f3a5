//! Turning stored objects into response bodies: the served version's `apiVersion`, list items
//! without type fields for built-ins (as the real server encodes them), and the
//! `PartialObjectMetadata` view kube-rs' metadata watchers ask for.

use bytes::Bytes;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::api::ListResult;
use crate::resources::ResourceDef;

/// What the client asked to see (from `Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Full,
    /// `application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`.
    Metadata,
}

/// One object as served through `def`.
pub struct Item<'a> {
    pub obj: &'a Value,
    pub def: &'a ResourceDef,
    pub view: View,
    /// Built-in list items carry no apiVersion/kind.
    pub in_list: bool,
}

impl Serialize for Item<'_> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let mut map = ser.serialize_map(None)?;
        if self.view == View::Metadata {
            map.serialize_entry("kind", "PartialObjectMetadata")?;
            map.serialize_entry("apiVersion", "meta.k8s.io/v1")?;
            map.serialize_entry("metadata", &self.obj["metadata"])?;
            return map.end();
        }
        if !self.in_list || self.def.custom {
            map.serialize_entry("apiVersion", &self.def.api_version())?;
            map.serialize_entry("kind", &self.def.kind)?;
        }
        if let Some(o) = self.obj.as_object() {
            for (k, v) in o {
                if k != "apiVersion" && k != "kind" {
                    map.serialize_entry(k, v)?;
                }
            }
        }
        map.end()
    }
}

pub fn object(def: &ResourceDef, obj: &Value, view: View) -> Bytes {
    let item = Item {
        obj,
        def,
        view,
        in_list: false,
    };
    Bytes::from(serde_json::to_vec(&item).unwrap_or_default())
}

/// A `kind: XList` body, serialized item by item without cloning the objects.
pub fn list(def: &ResourceDef, result: &ListResult, view: View) -> Bytes {
    let mut out = Vec::with_capacity(64 + result.items.len() * 256);
    let (kind, api_version) = match view {
        View::Metadata => (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        ),
        View::Full => (def.list_kind(), def.api_version()),
    };
    let mut meta = serde_json::json!({ "resourceVersion": result.resource_version.to_string() });
    if let Some(c) = &result.continue_token {
        meta["continue"] = Value::String(c.clone());
    }
    if let Some(r) = result.remaining {
        meta["remainingItemCount"] = Value::from(r);
    }
    out.extend_from_slice(b"{\"kind\":");
    serde_json::to_writer(&mut out, &kind).ok();
    out.extend_from_slice(b",\"apiVersion\":");
    serde_json::to_writer(&mut out, &api_version).ok();
    out.extend_from_slice(b",\"metadata\":");
    serde_json::to_writer(&mut out, &meta).ok();
    out.extend_from_slice(b",\"items\":[");
    for (i, obj) in result.items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let item = Item {
            obj,
            def,
            view,
            in_list: true,
        };
        serde_json::to_writer(&mut out, &item).ok();
    }
    out.extend_from_slice(b"]}");
    Bytes::from(out)
}

/// One line of a watch stream: `{"type":"ADDED","object":{...}}\n`.
pub fn watch_frame(event_type: &str, object_json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(object_json.len() + 32);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(object_json);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Registry;
    use serde_json::json;

    #[test]
    fn builtin_list_items_have_no_type_fields() {
        let r = Registry::default();
        let cm = r.get("", "v1", "configmaps").unwrap();
        let obj = std::sync::Arc::new(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}),
        );
        let res = ListResult {
            resource_version: 7,
            items: vec![obj],
            continue_token: None,
            remaining: None,
        };
        let body: Value = serde_json::from_slice(&list(&cm, &res, View::Full)).unwrap();
        assert_eq!(
            body,
            json!({"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                   "items": [{"metadata": {"name": "a"}}]})
        );
    }

    #[test]
    fn metadata_view_serves_partial_object_metadata() {
        let r = Registry::default();
        let cm = r.get("", "v1", "configmaps").unwrap();
        let obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        let body: Value = serde_json::from_slice(&object(&cm, &obj, View::Metadata)).unwrap();
        assert_eq!(
            body,
            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": {"name": "a"}})
        );
    }
}
