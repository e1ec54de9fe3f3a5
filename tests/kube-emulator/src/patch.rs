//! PATCH bodies: JSON patch (RFC 6902) and JSON merge patch (RFC 7386) exactly; strategic
//! merge patch and server-side apply approximated (see the README).

use serde_json::{Map, Value};

use crate::status::ApiError;

/// The PATCH flavours selected by `Content-Type`
/// (<https://kubernetes.io/docs/reference/using-api/api-concepts/#patch-and-apply>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
            "application/apply-patch+yaml" => Ok(PatchKind::Apply),
            _ => Err(ApiError::unsupported_media_type(ct)),
        }
    }
}

/// Applies `patch` (already parsed) to `doc`.
pub fn apply(kind: PatchKind, doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(doc, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })
        }
        PatchKind::Merge | PatchKind::Apply => {
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Strategic => {
            strategic_merge(doc, patch);
            Ok(())
        }
    }
}

/// An approximation of strategic merge patch: a merge patch in which lists of objects that
/// all carry a `name` are merged element-wise by name (as containers, env, volumes and ports
/// are in the real schema), `$patch: delete|replace` is honoured, and the other `$` directives
/// (`$setElementOrder`, `$retainKeys`, `$deleteFromPrimitiveList`) are dropped.
pub fn strategic_merge(doc: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *doc = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = p.clone();
        replaced.remove("$patch");
        *doc = strip_directives(&Value::Object(replaced));
        return;
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let Value::Object(d) = doc else { return };
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                d.remove(k);
            }
            Value::Object(o) if o.get("$patch").and_then(Value::as_str) == Some("delete") => {
                d.remove(k);
            }
            Value::Array(items) => match d.get_mut(k) {
                Some(Value::Array(existing)) if keyed_by_name(items) && keyed_by_name(existing) => {
                    merge_named_list(existing, items);
                }
                _ => {
                    d.insert(k.clone(), strip_directives(v));
                }
            },
            _ => strategic_merge(d.entry(k.clone()).or_insert(Value::Null), v),
        }
    }
}

fn keyed_by_name(items: &[Value]) -> bool {
    items
        .iter()
        .all(|i| i.get("name").is_some_and(Value::is_string))
}

fn merge_named_list(existing: &mut Vec<Value>, patch: &[Value]) {
    for item in patch {
        let name = item["name"].clone();
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        let pos = existing.iter().position(|e| e["name"] == name);
        match (pos, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (Some(i), false) => strategic_merge(&mut existing[i], item),
            (None, true) => {}
            (None, false) => existing.push(strip_directives(item)),
        }
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_removes_nulls_and_replaces_lists() {
        let mut d = json!({"data": {"a": "1", "b": "2"}, "list": [1, 2]});
        apply(
            PatchKind::Merge,
            &mut d,
            &json!({"data": {"a": null}, "list": [3]}),
        )
        .unwrap();
        assert_eq!(d, json!({"data": {"b": "2"}, "list": [3]}));
    }

    #[test]
    fn json_patch_test_failure_is_unprocessable() {
        let mut d = json!({"data": {"a": "1"}});
        let p = json!([{"op": "test", "path": "/data/a", "value": "2"}]);
        assert_eq!(apply(PatchKind::Json, &mut d, &p).unwrap_err().code, 422);
        let p = json!([{"op": "replace", "path": "/data/a", "value": "2"}]);
        apply(PatchKind::Json, &mut d, &p).unwrap();
        assert_eq!(d["data"]["a"], "2");
    }

    #[test]
    fn strategic_merge_merges_named_lists_and_drops_directives() {
        let mut d = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}
        ]}});
        let p = json!({
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "spec": {"containers": [
                {"name": "b", "image": "b:2"},
                {"name": "a", "$patch": "delete"}
            ]}
        });
        strategic_merge(&mut d, &p);
        assert_eq!(
            d,
            json!({"spec": {"containers": [{"name": "b", "image": "b:2"}]}})
        );
    }

    #[test]
    fn unknown_patch_content_type_is_unsupported_media_type() {
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+cbor")
                .unwrap_err()
                .code,
            415
        );
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
    }
}
