//! The verbs: create, get, list, update, patch, delete, deletecollection, following
//! <https://kubernetes.io/docs/reference/using-api/api-concepts/>.
//!
//! Every write is planned against a read snapshot, shown to validating webhooks without any
//! lock held, then committed only if the object is still the one it was planned against
//! (otherwise re-planned, like the apiserver's GuaranteedUpdate).

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::admission;
use crate::auth::UserInfo;
use crate::patch::{self, PatchKind};
use crate::resources::{ResourceDef, defs_from_crd};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Target};
use crate::store::{Key, State};

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_PLURAL: &str = "customresourcedefinitions";

/// Per-request options of a write.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub user: UserInfo,
    pub dry_run: bool,
    pub field_manager: Option<String>,
}

/// The admission operation of a planned change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

/// A change computed against a snapshot, not yet committed.
#[derive(Debug, Clone)]
pub enum Plan {
    Put {
        key: Key,
        old: Option<Arc<Value>>,
        new: Value,
        op: Operation,
    },
    Remove {
        key: Key,
        old: Arc<Value>,
        op: Operation,
    },
    Noop {
        current: Arc<Value>,
    },
}

/// What a committed (or dry-run) write produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub object: Arc<Value>,
    pub created: bool,
    pub removed: bool,
}

/// Parameters of LIST (and the selector part of WATCH).
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ListResult {
    pub resource_version: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn rv_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn target<'a>(def: &'a ResourceDef, name: &'a str) -> Target<'a> {
    Target {
        group: &def.group,
        plural: &def.plural,
        name,
    }
}

pub fn key_for(def: &ResourceDef, ns: Option<&str>, name: &str) -> Key {
    Key::new(
        &def.group,
        &def.plural,
        if def.namespaced {
            ns.unwrap_or_default()
        } else {
            ""
        },
        name,
    )
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_name(def: &ResourceDef, name: &str) -> Result<(), ApiError> {
    let (ok, rule) = if def.group == "rbac.authorization.k8s.io" {
        // RBAC objects are path-segment names (`system:controller:...`).
        (
            !name.is_empty()
                && !name.contains('/')
                && !name.contains('%')
                && name != "."
                && name != "..",
            "may not contain '/' or '%' and may not be '.' or '..'",
        )
    } else if def.plural == "namespaces" {
        (
            is_dns_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        )
    } else {
        (
            name.len() <= 253 && name.split('.').all(is_dns_label),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &def.kind,
            &def.group,
            name,
            "metadata.name",
            "Invalid value",
            &format!("\"{name}\": {rule}"),
        ))
    }
}

fn generate_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Checks `apiVersion`/`kind` of a body against the URL's resource, filling them in if absent.
fn check_type(def: &ResourceDef, body: &mut Value) -> Result<(), ApiError> {
    let Some(obj) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let api_version = def.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        None => {
            obj.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) if v == api_version => {}
        // Served versions of one CRD share storage; other versions are not converted.
        Some(v) if def.custom && crate::resources::split_api_version(v).0 == def.group => {
            obj.insert("apiVersion".into(), json!(api_version));
        }
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match obj.get("kind").and_then(Value::as_str) {
        None => {
            obj.insert("kind".into(), json!(def.kind));
        }
        Some(k) if k == def.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )));
        }
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj.insert("metadata".into(), Value::Object(Map::new()));
    }
    check_string_maps(def, body)
}

/// The string maps of the core types hold strings only (ConfigMap `data`/`binaryData`, Secret
/// `data`/`stringData`): the API server decodes them into Go `map[string]string` and refuses
/// anything else with 400, so a YAML `1e3` never becomes the number 1000.
fn check_string_maps(def: &ResourceDef, body: &Value) -> Result<(), ApiError> {
    let fields: &[&str] = match (def.group.as_str(), def.kind.as_str()) {
        ("", "ConfigMap") => &["data", "binaryData"],
        ("", "Secret") => &["data", "stringData"],
        _ => return Ok(()),
    };
    for field in fields {
        let Some(map) = body.get(*field).filter(|v| !v.is_null()) else {
            continue;
        };
        let bad = match map.as_object() {
            None => Some(format!("{field} must be an object")),
            Some(entries) => entries.iter().find(|(_, v)| !v.is_string()).map(|(k, v)| {
                format!(
                    "{field}.{k}: cannot unmarshal {} into a string",
                    json_type(v)
                )
            }),
        };
        if let Some(why) = bad {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"v1\" cannot be handled as a {kind}: {why}",
                kind = def.kind
            )));
        }
    }
    check_data_size(def, body, fields)
}

/// The most data a ConfigMap or Secret holds: keys plus (decoded) values.
const MAX_DATA_BYTES: usize = 1024 * 1024;

/// A ConfigMap's or Secret's data above [`MAX_DATA_BYTES`] is 422 Invalid, as on the real server
/// (base64 values count decoded).
fn check_data_size(def: &ResourceDef, body: &Value, fields: &[&str]) -> Result<(), ApiError> {
    let mut total = 0;
    for field in fields {
        let base64 = *field == "binaryData" || (def.kind == "Secret" && *field == "data");
        for (key, value) in body
            .get(*field)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let text = value.as_str().unwrap_or_default();
            let padding = text.bytes().rev().take_while(|b| *b == b'=').count();
            total += key.len()
                + if base64 {
                    (text.len() / 4 * 3).saturating_sub(padding)
                } else {
                    text.len()
                };
        }
    }
    if total > MAX_DATA_BYTES {
        let name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Err(ApiError::invalid(
            &def.kind,
            "",
            name,
            "data",
            "Too long",
            &format!("must have at most {MAX_DATA_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A ConfigMap or Secret created with `immutable: true` keeps its data and stays immutable (422
/// otherwise, as the real server).
fn check_immutable(
    def: &ResourceDef,
    name: &str,
    old: &Value,
    new: &Value,
) -> Result<(), ApiError> {
    let fields: &[&str] = match (def.group.as_str(), def.kind.as_str()) {
        ("", "ConfigMap") => &["data", "binaryData"],
        ("", "Secret") => &["data"],
        _ => return Ok(()),
    };
    if old.get("immutable") != Some(&Value::Bool(true)) {
        return Ok(());
    }
    const DETAIL: &str = "field is immutable when `immutable` is set";
    if new.get("immutable") != Some(&Value::Bool(true)) {
        return Err(ApiError::invalid(
            &def.kind,
            "",
            name,
            "immutable",
            "Forbidden",
            DETAIL,
        ));
    }
    let empty = Value::Object(Map::new());
    let map = |obj: &Value, field: &str| {
        obj.get(field)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(empty.clone())
    };
    for field in fields {
        if map(old, field) != map(new, field) {
            return Err(ApiError::invalid(
                &def.kind,
                "",
                name,
                field,
                "Forbidden",
                DETAIL,
            ));
        }
    }
    Ok(())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Everything but metadata (and status, when it is a subresource) — what `generation` tracks.
fn spec_part(def: &ResourceDef, obj: &Value) -> Value {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    o.remove("metadata");
    o.remove("apiVersion");
    o.remove("kind");
    if def.status_subresource {
        o.remove("status");
    }
    Value::Object(o)
}

fn same_ignoring_rv(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

fn finalizers_empty(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
}

impl Shared {
    pub fn def(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.store.read().registry.get(group, version, plural)
    }

    /// Plans, admits and commits a write; see the module doc.
    pub async fn run_plan(
        &self,
        def: &ResourceDef,
        subresource: Option<&str>,
        opts: &WriteOpts,
        plan: impl Fn(&State) -> Result<Plan, ApiError>,
    ) -> Result<Outcome, ApiError> {
        for _ in 0..16 {
            let planned = plan(&self.store.read())?;
            if let Plan::Noop { current } = &planned {
                return Ok(Outcome {
                    object: current.clone(),
                    created: false,
                    removed: false,
                });
            }
            admission::admit(self, def, subresource, &planned, opts).await?;
            if opts.dry_run {
                return Ok(match planned {
                    Plan::Put { new, old, .. } => Outcome {
                        object: Arc::new(new),
                        created: old.is_none(),
                        removed: false,
                    },
                    Plan::Remove { old, .. } => Outcome {
                        object: old,
                        created: false,
                        removed: true,
                    },
                    Plan::Noop { current } => Outcome {
                        object: current,
                        created: false,
                        removed: false,
                    },
                });
            }
            if let Some(done) = self.store.write(|s| commit(s, planned)) {
                return Ok(done);
            }
            // Raced with another writer: plan again against the new state.
        }
        Err(ApiError::internal(
            "too much contention on this object, giving up",
        ))
    }

    pub fn get(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.store
            .read()
            .get(&key_for(def, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(target(def, name)))
    }

    pub async fn create(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        mut body: Value,
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        check_type(def, &mut body)?;
        if def.namespaced && ns.is_none() {
            return Err(ApiError::method_not_allowed());
        }
        if def.namespaced
            && let Some(body_ns) = meta_str(&body, "namespace")
            && !body_ns.is_empty()
            && Some(body_ns) != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let generate = meta_str(&body, "name").is_none_or(str::is_empty);
        if generate && meta_str(&body, "generateName").is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                &def.kind,
                &def.group,
                "",
                "metadata.name",
                "Required value",
                "name or generateName is required",
            ));
        }
        if def.custom {
            // Custom resources' apiVersion stays as written (no conversion), so pin it here.
            body["apiVersion"] = json!(def.api_version());
        }
        self.run_plan(def, None, opts, |s| {
            let mut obj = body.clone();
            if generate {
                let prefix = meta_str(&obj, "generateName").unwrap_or_default();
                obj["metadata"]["name"] = json!(format!("{prefix}{}", generate_suffix()));
            }
            let name = meta_str(&obj, "name").unwrap_or_default().to_string();
            validate_name(def, &name)?;
            if def.namespaced {
                let ns = ns.unwrap_or_default();
                check_namespace_open(s, ns)?;
                obj["metadata"]["namespace"] = json!(ns);
            } else if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            let key = key_for(def, ns, &name);
            if s.get(&key).is_some() {
                return Err(ApiError::already_exists(target(def, &name)));
            }
            prepare_new(def, &mut obj)?;
            Ok(Plan::Put {
                key,
                old: None,
                new: obj,
                op: Operation::Create,
            })
        })
        .await
    }

    /// PUT on the object (`subresource` None) or on `/status`.
    pub async fn update(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        mut body: Value,
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        check_type(def, &mut body)?;
        match meta_str(&body, "name") {
            None | Some("") => body["metadata"]["name"] = json!(name),
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        let key = key_for(def, ns, name);
        self.run_plan(def, subresource, opts, |s| {
            let old = s
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(target(def, name)))?;
            plan_update(def, &key, old, body.clone(), subresource)
        })
        .await
    }

    // One argument per URL part and query option, mirroring the HTTP request.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        kind: PatchKind,
        patch_body: Value,
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        if kind == PatchKind::Strategic && def.custom {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            ));
        }
        if kind == PatchKind::Apply && opts.field_manager.is_none() {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "",
                "fieldManager",
                "Required value",
                "is required for apply patch",
            ));
        }
        let key = key_for(def, ns, name);
        let exists = self.store.read().get(&key).is_some();
        if !exists && kind == PatchKind::Apply && subresource.is_none() {
            // Server-side apply creates missing objects.
            let mut body = patch_body;
            if body["metadata"]["name"].is_null() {
                body["metadata"]["name"] = json!(name);
            }
            return match self.create(def, ns, body.clone(), opts).await {
                // Lost a race with another creator: apply onto what they made.
                Err(e) if e.reason == "AlreadyExists" => {
                    Box::pin(self.patch(def, ns, name, subresource, kind, body, opts)).await
                }
                other => other,
            };
        }
        self.run_plan(def, subresource, opts, |s| {
            let old = s
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(target(def, name)))?;
            let mut doc = (*old).clone();
            patch::apply(kind, &mut doc, &patch_body)?;
            check_string_maps(def, &doc)?;
            plan_update(def, &key, old, doc, subresource)
        })
        .await
    }

    pub async fn delete(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        name: &str,
        preconditions: &Value,
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        let key = key_for(def, ns, name);
        self.run_plan(def, None, opts, |s| {
            let old = s
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(target(def, name)))?;
            check_preconditions(def, name, &old, preconditions)?;
            if finalizers_empty(&old) {
                return Ok(Plan::Remove {
                    key: key.clone(),
                    old,
                    op: Operation::Delete,
                });
            }
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(Plan::Noop { current: old });
            }
            // Finalizers hold the object: mark it and let their owners remove it.
            let mut new = (*old).clone();
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            Ok(Plan::Put {
                key: key.clone(),
                old: Some(old),
                new,
                op: Operation::Delete,
            })
        })
        .await
    }

    pub fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        p: &ListParams,
    ) -> Result<ListResult, ApiError> {
        let s = self.store.read();
        let mut after: Option<(String, String)> = None;
        let at = if let Some(token) = p.continue_token.as_deref().filter(|t| !t.is_empty()) {
            if p.resource_version.as_deref().is_some_and(|v| !v.is_empty()) {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (rv, start) = decode_continue(token)?;
            s.check_rv(rv).map_err(|_| {
                ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                )
            })?;
            after = Some(start);
            rv
        } else {
            resolve_list_rv(&s, p)?
        };
        let limit = p.limit.filter(|l| *l > 0);
        let unfiltered = p.labels.is_empty() && p.fields.is_empty();
        let mut items = Vec::new();
        let mut last_key: Option<(String, String)> = None;
        let mut more = false;
        let mut remaining = 0u64;
        s.scan(
            &def.group,
            &def.plural,
            if def.namespaced { ns } else { None },
            after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())),
            at,
            |k, v| {
                if !(p.labels.matches(v) && p.fields.matches(v)) {
                    return true;
                }
                if limit.is_some_and(|l| items.len() >= l) {
                    more = true;
                    remaining += 1;
                    // Counting the rest only makes sense without selectors (as upstream);
                    // at the current state a tight count does it (below).
                    return unfiltered && at != s.rv();
                }
                last_key = Some((k.namespace.clone(), k.name.clone()));
                items.push(v.clone());
                true
            },
        )
        .map_err(|e| ApiError::too_old(e.requested, e.oldest))?;
        let scope_ns = if def.namespaced { ns } else { None };
        if more
            && unfiltered
            && at == s.rv()
            && let Some((lns, lname)) = &last_key
        {
            remaining = s.count_after(&def.group, &def.plural, scope_ns, (lns, lname));
        }
        let continue_token = if more {
            last_key.map(|k| encode_continue(at, &k))
        } else {
            None
        };
        Ok(ListResult {
            resource_version: at,
            items,
            continue_token,
            remaining: (more && unfiltered).then_some(remaining),
        })
    }
}

fn check_namespace_open(s: &State, ns: &str) -> Result<(), ApiError> {
    let key = Key::new("", "namespaces", "", ns);
    match s.get(&key) {
        None => Err(ApiError::not_found(Target {
            group: "",
            plural: "namespaces",
            name: ns,
        })),
        Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => Err(ApiError::new(
            403,
            "Forbidden",
            format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// As kube-apiserver does on every write of a Secret: `stringData` is write-only, merged into `data` (base64,
/// winning over a `data` key of the same name) and never stored.
fn fold_string_data(def: &ResourceDef, obj: &mut Value) {
    use base64::Engine as _;
    if !(def.group.is_empty() && def.plural == "secrets") {
        return;
    }
    let Some(Value::Object(string_data)) = obj.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !obj.get("data").is_some_and(Value::is_object) {
        obj["data"] = json!({});
    }
    for (key, value) in string_data {
        if let Some(text) = value.as_str() {
            obj["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        }
    }
}

/// Server-owned fields of a new object.
fn prepare_new(def: &ResourceDef, obj: &mut Value) -> Result<(), ApiError> {
    fold_string_data(def, obj);
    let m = obj["metadata"]
        .as_object_mut()
        .expect("checked by check_type");
    for f in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "generation",
    ] {
        m.remove(f);
    }
    m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert("creationTimestamp".into(), json!(now()));
    if def.tracks_generation() {
        m.insert("generation".into(), json!(1));
    }
    if def.group.is_empty() && def.plural == "namespaces" {
        obj["spec"] = json!({ "finalizers": ["kubernetes"] });
        obj["status"] = json!({ "phase": "Active" });
    } else if def.status_subresource
        && let Some(o) = obj.as_object_mut()
    {
        o.remove("status");
    }
    if def.group == CRD_GROUP && def.plural == CRD_PLURAL {
        defs_from_crd(obj).map_err(|(field, why)| {
            let name = meta_str(obj, "name").unwrap_or_default().to_string();
            let (cause, detail) = why.split_once(": ").unwrap_or((why.as_str(), ""));
            ApiError::invalid(&def.kind, &def.group, &name, &field, cause, detail)
        })?;
    }
    Ok(())
}

fn check_preconditions(
    def: &ResourceDef,
    name: &str,
    old: &Value,
    pre: &Value,
) -> Result<(), ApiError> {
    let got_uid = meta_str(old, "uid").unwrap_or_default();
    if let Some(uid) = pre.get("uid").and_then(Value::as_str)
        && uid != got_uid
    {
        return Err(ApiError::conflict_msg(
            target(def, name),
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {got_uid}"
            ),
        ));
    }
    if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
        && rv != rv_of(old)
    {
        return Err(ApiError::conflict_msg(
            target(def, name),
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                rv_of(old)
            ),
        ));
    }
    Ok(())
}

/// The update semantics shared by PUT and PATCH: optimistic concurrency on a provided
/// resourceVersion, immutable server fields, status subresource separation, generation.
fn plan_update(
    def: &ResourceDef,
    key: &Key,
    old: Arc<Value>,
    mut new: Value,
    subresource: Option<&str>,
) -> Result<Plan, ApiError> {
    let name = key.name.as_str();
    if !new.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    fold_string_data(def, &mut new);
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    if subresource.is_none() {
        check_immutable(def, name, &old, &new)?;
    }
    match meta_str(&new, "resourceVersion") {
        Some(rv) if !rv.is_empty() && rv != rv_of(&old) => {
            return Err(ApiError::conflict(target(def, name)));
        }
        _ => {}
    }
    if let Some(uid) = meta_str(&new, "uid")
        && !uid.is_empty()
        && Some(uid) != meta_str(&old, "uid")
    {
        return Err(ApiError::conflict_msg(
            target(def, name),
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(&old, "uid").unwrap_or_default()
            ),
        ));
    }
    if def.custom {
        new["apiVersion"] = old["apiVersion"].clone();
    }
    match subresource {
        Some("status") => {
            // Only status changes through /status.
            let status = new.get("status").cloned();
            new = (*old).clone();
            match status {
                Some(st) => new["status"] = st,
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        Some(other) => {
            return Err(ApiError::not_implemented(format!(
                "the {other} subresource"
            )));
        }
        None if def.status_subresource => match old.get("status") {
            Some(st) => new["status"] = st.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        },
        None => {}
    }
    let keep = [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "name",
        "namespace",
        "resourceVersion",
    ];
    {
        let nm = new["metadata"].as_object_mut().expect("ensured above");
        for f in keep {
            match old["metadata"].get(f) {
                Some(v) => nm.insert(f.to_string(), v.clone()),
                None => nm.remove(f),
            };
        }
    }
    if def.tracks_generation() && spec_part(def, &old) != spec_part(def, &new) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    if def.group == CRD_GROUP && def.plural == CRD_PLURAL {
        defs_from_crd(&new).map_err(|(field, why)| {
            let (cause, detail) = why.split_once(": ").unwrap_or((why.as_str(), ""));
            ApiError::invalid(&def.kind, &def.group, name, &field, cause, detail)
        })?;
    }
    if same_ignoring_rv(&old, &new) {
        return Ok(Plan::Noop { current: old });
    }
    if new.pointer("/metadata/deletionTimestamp").is_some() && finalizers_empty(&new) {
        // The last finalizer is gone: the pending deletion completes.
        return Ok(Plan::Remove {
            key: key.clone(),
            old,
            op: Operation::Update,
        });
    }
    Ok(Plan::Put {
        key: key.clone(),
        old: Some(old),
        new,
        op: Operation::Update,
    })
}

fn resolve_list_rv(s: &State, p: &ListParams) -> Result<u64, ApiError> {
    let current = s.rv();
    let rv = p.resource_version.as_deref().filter(|v| !v.is_empty());
    let m = p
        .resource_version_match
        .as_deref()
        .filter(|v| !v.is_empty());
    let Some(rv) = rv else {
        if m.is_some() {
            return Err(ApiError::bad_request(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        return Ok(current);
    };
    let n: u64 = rv
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?;
    let too_large = || {
        let mut e = ApiError::timeout(format!(
            "Too large resource version: {n}, current: {current}"
        ));
        e.details = Some(json!({
            "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
            "retryAfterSeconds": 1,
        }));
        e
    };
    match m {
        None | Some("NotOlderThan") => {
            if n > current {
                return Err(too_large());
            }
            Ok(current)
        }
        Some("Exact") => {
            if n == 0 {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            if n > current {
                return Err(too_large());
            }
            s.check_rv(n).map_err(|e| {
                ApiError::expired(format!(
                    "The resourceVersion for the provided list is too old. (requested {}, oldest {})",
                    e.requested, e.oldest
                ))
            })?;
            Ok(n)
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
        ))),
    }
}

fn encode_continue(rv: u64, start: &(String, String)) -> String {
    let body = json!({ "v": "meta.k8s.io/v1", "rv": rv, "ns": start.0, "name": start.1 });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(body.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let ns = v["ns"].as_str().ok_or_else(bad)?.to_string();
    let name = v["name"].as_str().ok_or_else(bad)?.to_string();
    Ok((rv, (ns, name)))
}

/// Applies a plan if the object is still the one it was planned against; runs the side
/// effects that a real cluster's controllers would (CRD establishment, cascades).
fn commit(s: &mut State, plan: Plan) -> Option<Outcome> {
    let (key, planned_rv) = match &plan {
        Plan::Put { key, old, .. } => (key.clone(), old.as_ref().map(|o| rv_of(o).to_string())),
        Plan::Remove { key, old, .. } => (key.clone(), Some(rv_of(old).to_string())),
        Plan::Noop { current } => {
            return Some(Outcome {
                object: current.clone(),
                created: false,
                removed: false,
            });
        }
    };
    if s.get(&key).map(|o| rv_of(o).to_string()) != planned_rv {
        return None;
    }
    let is_crd = key.group == CRD_GROUP && key.plural == CRD_PLURAL;
    Some(match plan {
        Plan::Put { key, old, new, .. } => {
            let created = old.is_none();
            let stored = s.put(key.clone(), new);
            if is_crd {
                establish_crd(s, &key, old.as_deref(), &stored);
            }
            Outcome {
                object: stored,
                created,
                removed: false,
            }
        }
        Plan::Remove { key, .. } => {
            let gone = s.remove(&key).expect("checked present");
            if is_crd {
                remove_crd_resources(s, &gone);
            }
            if key.group.is_empty() && key.plural == "namespaces" {
                for k in s.keys_in_namespace(&key.name) {
                    s.remove(&k);
                }
            }
            Outcome {
                object: gone,
                created: false,
                removed: true,
            }
        }
        Plan::Noop { .. } => unreachable!("handled above"),
    })
}

/// What the apiextensions controllers do: serve the CRD's versions and report
/// `NamesAccepted` and `Established` in a follow-up status write.
fn establish_crd(s: &mut State, key: &Key, old: Option<&Value>, stored: &Arc<Value>) {
    let Ok(defs) = defs_from_crd(stored) else {
        return;
    };
    if let Some(old) = old
        && let Ok(old_defs) = defs_from_crd(old)
        && let Some(d) = old_defs.first()
    {
        s.registry.remove(&d.group, &d.plural);
    }
    let names = stored["spec"]["names"].clone();
    let stored_versions: Vec<String> = defs.iter().take(1).map(|d| d.version.clone()).collect();
    for d in defs {
        s.registry.insert(d);
    }
    if stored.pointer("/metadata/deletionTimestamp").is_some() {
        return;
    }
    let established = stored["status"]["acceptedNames"] == names
        && stored["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
    if established {
        return;
    }
    let ts = now();
    let condition = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": ts, "reason": reason, "message": message});
    let mut with_status = (**stored).clone();
    with_status["status"] = json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": names,
        "storedVersions": stored_versions,
    });
    s.put(key.clone(), with_status);
}

/// A deleted CRD takes its custom resources and their discovery entries with it.
fn remove_crd_resources(s: &mut State, crd: &Value) {
    let group = crd["spec"]["group"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let plural = crd["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for k in s.keys_of(&group, &plural) {
        s.remove(&k);
    }
    s.registry.remove(&group, &plural);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, &("ns".into(), "name".into()));
        assert_eq!(
            decode_continue(&t).unwrap(),
            (42, ("ns".into(), "name".into()))
        );
        assert_eq!(decode_continue("garbage!").unwrap_err().code, 400);
    }

    #[test]
    fn names_are_validated_per_resource_kind() {
        let r = crate::resources::Registry::default();
        let cm = r.get("", "v1", "configmaps").unwrap();
        assert!(validate_name(&cm, "a.b-c").is_ok());
        assert_eq!(validate_name(&cm, "Bad_Name").unwrap_err().code, 422);
        let ns = r.get("", "v1", "namespaces").unwrap();
        assert!(validate_name(&ns, "a.b").is_err());
        let role = r
            .get("rbac.authorization.k8s.io", "v1", "clusterroles")
            .unwrap();
        assert!(validate_name(&role, "system:controller:x").is_ok());
    }

    #[test]
    fn configmap_and_secret_maps_hold_strings_only() {
        let r = crate::resources::Registry::default();
        let cm = r.get("", "v1", "configmaps").unwrap();
        let secret = r.get("", "v1", "secrets").unwrap();
        let deploy = r.get("apps", "v1", "deployments").unwrap();
        assert!(
            check_string_maps(
                &cm,
                &json!({"data": {"a": "1e3"}, "binaryData": {"b": "AA=="}})
            )
            .is_ok()
        );
        assert!(check_string_maps(&cm, &json!({"data": null})).is_ok());
        for bad in [
            json!({"data": {"a": 1000}}),
            json!({"data": {"a": true}}),
            json!({"data": {"a": null}}),
            json!({"binaryData": {"b": ["x"]}}),
            json!({"data": "not a map"}),
        ] {
            let err = check_string_maps(&cm, &bad).unwrap_err();
            assert_eq!(
                (err.code, err.reason.as_str()),
                (400, "BadRequest"),
                "{bad}"
            );
        }
        assert_eq!(
            check_string_maps(&secret, &json!({"stringData": {"n": 1}}))
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            check_string_maps(&secret, &json!({"data": {"n": {}}}))
                .unwrap_err()
                .code,
            400
        );
        // At most 1 MiB of data, base64 values counted decoded.
        let fits = "A".repeat(1024 * 1024 / 3 * 4 - 8);
        assert!(check_string_maps(&secret, &json!({"data": {"k": fits}})).is_ok());
        let over = "A".repeat(1024 * 1024 / 3 * 4 + 8);
        assert_eq!(
            check_string_maps(&secret, &json!({"data": {"k": over}}))
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            check_string_maps(&cm, &json!({"data": {"k": "x".repeat(1024 * 1024)}}))
                .unwrap_err()
                .code,
            422
        );
        assert!(
            check_string_maps(&cm, &json!({"data": {"k": "x".repeat(1024 * 1024 - 1)}})).is_ok()
        );
        // Other kinds have no such maps.
        assert!(check_string_maps(&deploy, &json!({"data": {"n": 1}})).is_ok());
    }

    #[test]
    fn immutable_configmaps_and_secrets_keep_their_data() {
        let r = crate::resources::Registry::default();
        let cm = r.get("", "v1", "configmaps").unwrap();
        let secret = r.get("", "v1", "secrets").unwrap();
        let frozen =
            json!({"immutable": true, "data": {"k": "v"}, "metadata": {"labels": {"a": "b"}}});
        // Metadata may change.
        let relabeled =
            json!({"immutable": true, "data": {"k": "v"}, "metadata": {"labels": {"a": "c"}}});
        assert!(check_immutable(&cm, "x", &frozen, &relabeled).is_ok());
        for changed in [
            json!({"immutable": true, "data": {"k": "w"}}),
            json!({"immutable": true, "data": {"k": "v"}, "binaryData": {"b": "AA=="}}),
            json!({"immutable": false, "data": {"k": "v"}}),
            json!({"data": {"k": "v"}}),
        ] {
            let err = check_immutable(&cm, "x", &frozen, &changed).unwrap_err();
            assert_eq!(
                (err.code, err.reason.as_str()),
                (422, "Invalid"),
                "{changed}"
            );
        }
        assert_eq!(
            check_immutable(
                &secret,
                "s",
                &frozen,
                &json!({"immutable": true, "data": {}})
            )
            .unwrap_err()
            .code,
            422
        );
        // Not immutable: anything goes.
        assert!(
            check_immutable(&cm, "x", &json!({"data": {"k": "v"}}), &json!({"data": {}})).is_ok()
        );
    }
}
