//! The HTTP edge: URL routing, content negotiation, identity, fault injection, and the
//! mapping of verbs onto [`crate::api`] and [`crate::watch`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, Method, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::Shared;
use crate::api::{ListParams, ListResult, Outcome, WriteOpts};
use crate::auth::UserInfo;
use crate::discovery;
use crate::openapi;
use crate::patch::PatchKind;
use crate::render::{self, View};
use crate::resources::ResourceDef;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError, Target};
use crate::watch::{self, WatchParams};

pub type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until shutdown; each connection is served by hyper's HTTP/1.1.
pub async fn serve(listener: TcpListener, shared: Shared) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let cancel = shared.shutdown.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = cancel.cancelled() => {}
                    }
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

fn full(status: u16, content_type: &str, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header("Audit-Id", uuid::Uuid::new_v4().to_string())
        .body(Full::new(body).boxed())
        .expect("valid response")
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    full(status, "application/json", Bytes::from(v.to_string()))
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if let Some(secs) = e.retry_after
        && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn flag(q: &Query, name: &str) -> bool {
    matches!(q.get(name).map(String::as_str), Some("true" | "1"))
}

/// One request, start to finish.
async fn handle(shared: Shared, req: http::Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    if let Some(op) = path.strip_prefix("/_emulator/") {
        return emulator_endpoint(&shared, &parts.method, op, &query);
    }
    shared.requests.any();
    if let Some(delay) = shared.faults.delay() {
        tokio::time::sleep(delay).await;
    }
    let user = match shared.tokens().authenticate(&parts.headers) {
        Ok(u) => u,
        Err(e) => return error_response(&e),
    };
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    let req = Req {
        method: parts.method,
        headers: parts.headers,
        query,
        body,
        user,
    };
    match route(&shared, &path, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

struct Req {
    method: Method,
    headers: HeaderMap,
    query: Query,
    body: Bytes,
    user: UserInfo,
}

impl Req {
    fn header(&self, name: http::header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn accept(&self) -> &str {
        self.header(http::header::ACCEPT)
    }

    fn write_opts(&self) -> Result<WriteOpts, ApiError> {
        let dry_run = match self.query.get("dryRun").map(String::as_str) {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "dryRun: Unsupported value: {other:?}: supported values: \"All\""
                )));
            }
        };
        Ok(WriteOpts {
            user: self.user.clone(),
            dry_run,
            field_manager: self.query.get("fieldManager").cloned(),
        })
    }
}

/// JSON in, or YAML for convenience; protobuf and anything else get 415.
fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let base = content_type.split(';').next().unwrap_or_default().trim();
    match base {
        "" | "application/json" => serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the object provided is not valid JSON: {e}"))
        }),
        "application/yaml" | "application/apply-patch+yaml" => parse_yaml_or_json(body),
        _ => Err(ApiError::unsupported_media_type(content_type)),
    }
}

fn parse_yaml_or_json(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice(body) {
        return Ok(v);
    }
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    serde_saphyr::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the object provided is not valid YAML: {e}")))
}

/// The response view `Accept` asks for; 406 when it admits no JSON at all.
fn negotiate(accept: &str) -> Result<View, ApiError> {
    if accept.trim().is_empty() {
        return Ok(View::Full);
    }
    for part in accept.split(',') {
        let mut it = part.split(';').map(str::trim);
        let base = it.next().unwrap_or_default();
        let params: Vec<&str> = it.collect();
        if !matches!(base, "application/json" | "*/*" | "application/*") {
            continue;
        }
        let as_ = params.iter().find_map(|p| p.strip_prefix("as="));
        match as_ {
            None => return Ok(View::Full),
            Some("PartialObjectMetadata" | "PartialObjectMetadataList") => {
                return Ok(View::Metadata);
            }
            // Tables and other server-side conversions are not emulated.
            Some(_) => continue,
        }
    }
    Err(ApiError::not_acceptable(accept))
}

fn not_found_path() -> ApiError {
    let mut e = ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    );
    e.details = Some(json!({}));
    e
}

/// A parsed resource URL.
#[derive(Debug, Clone, Default)]
struct ResPath {
    group: String,
    version: String,
    watch_prefix: bool,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_resource_path(group: &str, version: &str, rest: &[&str]) -> Option<ResPath> {
    let mut rest = rest;
    let mut p = ResPath {
        group: group.to_string(),
        version: version.to_string(),
        ..Default::default()
    };
    if rest.first() == Some(&"watch") {
        p.watch_prefix = true;
        rest = &rest[1..];
    }
    let is_namespace_sub = group.is_empty()
        && rest.len() == 3
        && rest[0] == "namespaces"
        && matches!(rest[2], "status" | "finalize");
    if rest.len() >= 3 && rest[0] == "namespaces" && !is_namespace_sub {
        p.namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    match rest {
        [plural] => p.plural = plural.to_string(),
        [plural, name] => {
            p.plural = plural.to_string();
            p.name = Some(name.to_string());
        }
        [plural, name, sub] => {
            p.plural = plural.to_string();
            p.name = Some(name.to_string());
            p.sub = Some(sub.to_string());
        }
        _ => return None,
    }
    Some(p)
}

/// A URL path segment with its `%XX` escapes decoded, as the API server reads names from the
/// path (`configmaps/a%2Db` is `a-b`). A malformed escape stays as it is.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(shared: &Shared, path: &str, req: Req) -> Result<Response<Body>, ApiError> {
    let decoded: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let get_only = |r: Result<Response<Body>, ApiError>| {
        if req.method == Method::GET || req.method == Method::HEAD {
            r
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segs.as_slice() {
        ["version"] => get_only(Ok(json_response(200, &discovery::version()))),
        ["healthz" | "livez" | "readyz", ..] => {
            get_only(Ok(full(200, "text/plain", Bytes::from_static(b"ok"))))
        }
        ["api"] => get_only(discovery_root(shared, &req, true)),
        ["apis"] => get_only(discovery_root(shared, &req, false)),
        ["api", version] => get_only(resource_list(shared, "", version)),
        ["apis", group] => get_only({
            let reg = &shared.store.read().registry;
            if reg.group_versions(group).is_empty() || shared.faults.is_hidden(group) {
                Err(not_found_path())
            } else {
                Ok(json_response(200, &discovery::api_group(reg, group)))
            }
        }),
        ["apis", group, version] => get_only(resource_list(shared, group, version)),
        ["openapi", "v3"] => get_only(Ok(json_response(
            200,
            &openapi::index(&shared.store.read().registry),
        ))),
        ["openapi", "v3", "api", version] => get_only(openapi_doc(shared, "", version)),
        ["openapi", "v3", "apis", group, version] => get_only(openapi_doc(shared, group, version)),
        ["api", version, rest @ ..] => match parse_resource_path("", version, rest) {
            Some(p) => resource(shared, p, req).await,
            None => Err(not_found_path()),
        },
        ["apis", group, version, rest @ ..] => match parse_resource_path(group, version, rest) {
            Some(p) => resource(shared, p, req).await,
            None => Err(not_found_path()),
        },
        _ => Err(not_found_path()),
    }
}

fn openapi_doc(shared: &Shared, group: &str, version: &str) -> Result<Response<Body>, ApiError> {
    openapi::group_version(&shared.store.read().registry, group, version)
        .map(|doc| json_response(200, &doc))
        .ok_or_else(not_found_path)
}

fn discovery_root(shared: &Shared, req: &Req, core: bool) -> Result<Response<Body>, ApiError> {
    let reg = &shared.store.read().registry;
    if let Some(version) = discovery::wants_aggregated(req.accept()) {
        let body = discovery::aggregated(reg, &shared.faults, core, version);
        let ct = discovery::AGGREGATED_CONTENT_TYPE.replace("v=v2", &format!("v={version}"));
        return Ok(full(200, &ct, Bytes::from(body.to_string())));
    }
    negotiate(req.accept())?;
    let body = if core {
        discovery::api_versions(&shared.addr.to_string())
    } else {
        discovery::api_group_list(reg, &shared.faults)
    };
    Ok(json_response(200, &body))
}

fn resource_list(shared: &Shared, group: &str, version: &str) -> Result<Response<Body>, ApiError> {
    let reg = &shared.store.read().registry;
    if !reg.group_versions(group).iter().any(|v| v == version) || shared.faults.is_hidden(group) {
        return Err(not_found_path());
    }
    Ok(json_response(
        200,
        &discovery::resource_list(reg, group, version),
    ))
}

fn verb(req: &Req, p: &ResPath) -> &'static str {
    let watch = p.watch_prefix || flag(&req.query, "watch");
    match (&req.method, p.name.is_some()) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

fn list_params(q: &Query) -> Result<ListParams, ApiError> {
    Ok(ListParams {
        labels: LabelSelector::parse(
            q.get("labelSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )?,
        fields: FieldSelector::parse(
            q.get("fieldSelector")
                .map(String::as_str)
                .unwrap_or_default(),
        )?,
        limit: match q.get("limit").filter(|l| !l.is_empty()) {
            Some(l) => Some(
                l.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit: {l:?}")))?,
            ),
            None => None,
        },
        continue_token: q.get("continue").cloned(),
        resource_version: q.get("resourceVersion").cloned(),
        resource_version_match: q.get("resourceVersionMatch").cloned(),
    })
}

async fn resource(shared: &Shared, p: ResPath, req: Req) -> Result<Response<Body>, ApiError> {
    let def = shared
        .def(&p.group, &p.version, &p.plural)
        .ok_or_else(not_found_path)?;
    if !def.namespaced && p.namespace.is_some() {
        return Err(not_found_path());
    }
    if def.namespaced && p.namespace.is_none() && p.name.is_some() {
        return Err(not_found_path());
    }
    let verb = verb(&req, &p);
    if verb == "unknown" {
        return Err(ApiError::method_not_allowed());
    }
    let all_namespaces = def.namespaced && p.namespace.is_none();
    shared
        .requests
        .resource(verb, &def.group, &def.plural, all_namespaces);
    if shared.faults.is_forbidden(&def.group, &def.plural)
        || (all_namespaces
            && shared
                .faults
                .is_forbidden_in_all_namespaces(&def.group, &def.plural))
    {
        return Err(ApiError::forbidden(
            &req.user.username,
            verb,
            &def.group,
            &def.plural,
            p.namespace.as_deref(),
        ));
    }
    if let Some(code) = shared.faults.take_failure(&def.group, &def.plural) {
        return Err(if code == 429 {
            ApiError::too_many_requests(1)
        } else {
            ApiError::new(
                code,
                "InternalError",
                "Internal error occurred: injected by kube-emulator",
            )
        });
    }
    if def.create_only {
        return create_only(&def, verb, &req);
    }
    if let Some(sub) = p.sub.as_deref()
        && (sub != "status" || !def.status_subresource)
    {
        return Err(ApiError::not_implemented(format!(
            "the {sub} subresource of {}",
            def.plural
        )));
    }
    let ns = p.namespace.as_deref();
    let name = p.name.as_deref().unwrap_or_default();
    let sub = p.sub.as_deref();
    match verb {
        "get" => {
            let view = negotiate(req.accept())?;
            let obj = shared.get(&def, ns, name)?;
            Ok(full(
                200,
                "application/json",
                render::object(&def, &obj, view),
            ))
        }
        "list" => {
            let view = negotiate(req.accept())?;
            let params = list_params(&req.query)?;
            let result = shared.list(&def, ns, &params)?;
            Ok(full(
                200,
                "application/json",
                render::list(&def, &result, view),
            ))
        }
        "watch" => {
            let view = negotiate(req.accept())?;
            let mut list = list_params(&req.query)?;
            if let Some(name) = p.name.as_deref() {
                let sel = match list.fields.is_empty() {
                    true => format!("metadata.name={name}"),
                    false => format!("metadata.name={name},{}", req.query["fieldSelector"]),
                };
                list.fields = FieldSelector::parse(&sel)?;
            }
            let params = WatchParams {
                list,
                namespace: p.namespace.clone(),
                allow_bookmarks: flag(&req.query, "allowWatchBookmarks"),
                send_initial_events: flag(&req.query, "sendInitialEvents"),
                timeout: req
                    .query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .filter(|t| *t > 0)
                    .map(Duration::from_secs),
                view: Some(view),
            };
            let rx = watch::start(shared.clone(), def.clone(), params)?;
            let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
            Ok(Response::builder()
                .status(200)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::CACHE_CONTROL, "no-cache, private")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .expect("valid response"))
        }
        "create" => {
            if p.name.is_some() {
                return Err(ApiError::method_not_allowed());
            }
            let view = negotiate(req.accept())?;
            let body = parse_body(req.header(http::header::CONTENT_TYPE), &req.body)?;
            let out = shared.create(&def, ns, body, &req.write_opts()?).await?;
            Ok(full(
                if out.created { 201 } else { 200 },
                "application/json",
                render::object(&def, &out.object, view),
            ))
        }
        "update" => {
            let view = negotiate(req.accept())?;
            let body = parse_body(req.header(http::header::CONTENT_TYPE), &req.body)?;
            let out = shared
                .update(&def, ns, name, sub, body, &req.write_opts()?)
                .await?;
            Ok(full(
                200,
                "application/json",
                render::object(&def, &out.object, view),
            ))
        }
        "patch" => {
            let view = negotiate(req.accept())?;
            let ct = req.header(http::header::CONTENT_TYPE);
            let kind = PatchKind::from_content_type(ct)?;
            let body = if kind == PatchKind::Apply {
                parse_yaml_or_json(&req.body)?
            } else {
                serde_json::from_slice(&req.body).map_err(|e| {
                    ApiError::bad_request(format!("the patch is not valid JSON: {e}"))
                })?
            };
            let out = shared
                .patch(&def, ns, name, sub, kind, body, &req.write_opts()?)
                .await?;
            Ok(full(
                if out.created { 201 } else { 200 },
                "application/json",
                render::object(&def, &out.object, view),
            ))
        }
        "delete" => {
            let view = negotiate(req.accept())?;
            let (pre, opts) = delete_options(&req)?;
            let out = shared.delete(&def, ns, name, &pre, &opts).await?;
            Ok(delete_response(&def, name, &out, view))
        }
        "deletecollection" => {
            let view = negotiate(req.accept())?;
            let (_, opts) = delete_options(&req)?;
            let mut params = list_params(&req.query)?;
            params.limit = None;
            params.continue_token = None;
            let listed = shared.list(&def, ns, &params)?;
            let mut deleted = Vec::new();
            for item in &listed.items {
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                let item_ns = item["metadata"]["namespace"].as_str();
                match shared
                    .delete(&def, item_ns, name, &Value::Null, &opts)
                    .await
                {
                    Ok(out) if out.removed => deleted.push(item.clone()),
                    Ok(out) => deleted.push(out.object),
                    // Deleted concurrently: nothing left to do for it.
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            let result = ListResult {
                resource_version: shared.store.read().rv(),
                items: deleted,
                continue_token: None,
                remaining: None,
            };
            Ok(full(
                200,
                "application/json",
                render::list(&def, &result, view),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// DeleteOptions from the body and the query (`dryRun`, `preconditions`).
fn delete_options(req: &Req) -> Result<(Value, WriteOpts), ApiError> {
    let mut opts = req.write_opts()?;
    let body: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        parse_body(req.header(http::header::CONTENT_TYPE), &req.body)?
    };
    if body["dryRun"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "All"))
    {
        opts.dry_run = true;
    }
    Ok((body["preconditions"].clone(), opts))
}

fn delete_response(def: &ResourceDef, name: &str, out: &Outcome, view: View) -> Response<Body> {
    // Upstream returns the object for custom resources, pods and pending (finalized)
    // deletions, and a Success Status for most other built-ins.
    let returns_object =
        def.custom || (def.group.is_empty() && def.plural == "pods") || !out.removed;
    if returns_object {
        return full(
            200,
            "application/json",
            render::object(def, &out.object, view),
        );
    }
    let uid = out.object["metadata"]["uid"].as_str().unwrap_or_default();
    let target = Target {
        group: &def.group,
        plural: &def.plural,
        name,
    };
    json_response(200, &status::success_status(target, uid))
}

/// `SelfSubjectReview` (`kubectl auth whoami`): reports who the request was made as.
fn create_only(def: &ResourceDef, verb: &str, req: &Req) -> Result<Response<Body>, ApiError> {
    if verb != "create" {
        return Err(ApiError::method_not_allowed());
    }
    let body = json!({
        "kind": def.kind,
        "apiVersion": def.api_version(),
        "metadata": { "creationTimestamp": null },
        "status": { "userInfo": req.user.to_json() },
    });
    Ok(json_response(201, &body))
}

fn emulator_endpoint(shared: &Shared, method: &Method, op: &str, q: &Query) -> Response<Body> {
    let ok = || json_response(200, &json!({ "ok": true }));
    let arg = |name: &str| q.get(name).map(String::as_str).unwrap_or_default();
    let num =
        |name: &str, default: u64| q.get(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    if op == "stats" {
        let s = shared.store.read();
        return json_response(
            200,
            &json!({
                "resourceVersion": s.rv(),
                "objects": s.object_count(),
                "history": s.history_len(),
                "historyStart": s.history_start(),
                "openWatches": shared.open_watches.load(Ordering::Relaxed),
                "requests": shared.requests.counts().total,
            }),
        );
    }
    if method != Method::POST {
        return error_response(&ApiError::method_not_allowed());
    }
    let faults = &shared.faults;
    match op {
        "compact" => faults.compact_history(),
        "close-watches" => faults.close_watches(),
        "fail" => faults.fail_next(
            arg("resource"),
            num("count", 1) as u32,
            num("code", 500) as u16,
        ),
        "delay" => faults.set_delay(Duration::from_millis(num("ms", 0))),
        "forbid" => faults.forbid(arg("resource")),
        "allow" => faults.allow(arg("resource")),
        "forbid-all-namespaces" => faults.forbid_in_all_namespaces(arg("resource")),
        "hide-group" => faults.hide_group(arg("group"), Duration::from_secs(num("seconds", 30))),
        "unhide-group" => faults.unhide_group(arg("group")),
        "reset" => faults.reset(),
        _ => return error_response(&not_found_path()),
    }
    ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_parse_like_the_apiserver() {
        let p = parse_resource_path("", "v1", &["namespaces", "ns", "configmaps", "cm"]).unwrap();
        assert_eq!(
            (p.namespace.as_deref(), p.plural.as_str(), p.name.as_deref()),
            (Some("ns"), "configmaps", Some("cm"))
        );
        let p = parse_resource_path("", "v1", &["namespaces", "ns", "status"]).unwrap();
        assert_eq!(
            (p.namespace, p.plural.as_str(), p.sub.as_deref()),
            (None, "namespaces", Some("status"))
        );
        let p = parse_resource_path("apps", "v1", &["watch", "namespaces", "ns", "deployments"])
            .unwrap();
        assert!(p.watch_prefix);
        assert_eq!(p.plural, "deployments");
        let p = parse_resource_path("", "v1", &["namespaces"]).unwrap();
        assert_eq!((p.namespace, p.plural.as_str()), (None, "namespaces"));
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("space%20name"), "space name");
        assert_eq!(percent_decode("%61%62-c"), "ab-c");
        assert_eq!(percent_decode("plain"), "plain");
        // Malformed escapes stay as they are.
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn accept_negotiation_prefers_json_and_refuses_protobuf_only() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(kubectl).unwrap(), View::Full);
        assert_eq!(
            negotiate("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1").unwrap(),
            View::Metadata
        );
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf")
                .unwrap_err()
                .code,
            406
        );
        assert_eq!(
            negotiate("application/vnd.kubernetes.protobuf, */*").unwrap(),
            View::Full
        );
        assert_eq!(
            negotiate("application/json;as=Table;v=v1;g=meta.k8s.io")
                .unwrap_err()
                .code,
            406
        );
    }

    #[test]
    fn protobuf_bodies_are_unsupported_media() {
        assert_eq!(
            parse_body("application/vnd.kubernetes.protobuf", b"\x00")
                .unwrap_err()
                .code,
            415
        );
        assert_eq!(
            parse_body("application/yaml", b"a: 1").unwrap(),
            json!({"a": 1})
        );
    }
}
