//! Validating admission webhooks
//! (<https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/>):
//! every `ValidatingWebhookConfiguration` in the store is matched against each planned write
//! and called over HTTPS with an `admission.k8s.io/v1` AdmissionReview.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};

use crate::Shared;
use crate::api::{Operation, Plan, WriteOpts};
use crate::resources::ResourceDef;
use crate::selector::LabelSelector;
use crate::status::ApiError;
use crate::store::Key;

const VWC_GROUP: &str = "admissionregistration.k8s.io";

/// Runs the matching validating webhooks for `plan`; the first denial or (with
/// `failurePolicy: Fail`) the first failed call rejects the write.
pub async fn admit(
    shared: &Shared,
    def: &ResourceDef,
    subresource: Option<&str>,
    plan: &Plan,
    opts: &WriteOpts,
) -> Result<(), ApiError> {
    // Webhook configurations are never themselves subject to webhooks (as upstream).
    if def.group == VWC_GROUP {
        return Ok(());
    }
    let (key, op, object, old_object) = match plan {
        Plan::Put { key, old, new, op } => (
            key,
            *op,
            if *op == Operation::Delete {
                None
            } else {
                Some(new.clone())
            },
            old.as_deref().cloned(),
        ),
        Plan::Remove { key, old, op } => (key, *op, None, Some((**old).clone())),
        Plan::Noop { .. } => return Ok(()),
    };
    let (configs, ns_labels) = {
        let s = shared.store.read();
        let mut configs = Vec::new();
        s.scan(
            VWC_GROUP,
            "validatingwebhookconfigurations",
            None,
            None,
            s.rv(),
            |_, v| {
                configs.push(v.clone());
                true
            },
        )
        .ok();
        let ns_labels = if def.group.is_empty() && def.plural == "namespaces" {
            object
                .as_ref()
                .or(old_object.as_ref())
                .map(|o| o["metadata"]["labels"].clone())
        } else if def.namespaced {
            s.get(&Key::new("", "namespaces", "", &key.namespace))
                .map(|n| n["metadata"]["labels"].clone())
        } else {
            None
        };
        (configs, ns_labels)
    };
    if configs.is_empty() {
        return Ok(());
    }
    for config in configs {
        for hook in config["webhooks"].as_array().into_iter().flatten() {
            if !matches(
                hook,
                def,
                subresource,
                op,
                ns_labels.as_ref(),
                object.as_ref(),
                old_object.as_ref(),
            )? {
                continue;
            }
            let review = review_request(
                def,
                subresource,
                key,
                op,
                object.as_ref(),
                old_object.as_ref(),
                opts,
            );
            call_one(shared, hook, review).await?;
        }
    }
    Ok(())
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_matches(rule: &Value, def: &ResourceDef, subresource: Option<&str>, op: Operation) -> bool {
    let any = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let resource = match subresource {
        Some(sub) => format!("{}/{sub}", def.plural),
        None => def.plural.clone(),
    };
    let resource_ok = strings(&rule["resources"]).iter().any(|r| {
        *r == "*/*"
            || *r == resource
            || (*r == "*" && subresource.is_none())
            || subresource
                .is_some_and(|sub| *r == format!("*/{sub}") || *r == format!("{}/*", def.plural))
    });
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !def.namespaced,
        "Namespaced" => def.namespaced,
        _ => true,
    };
    any(strings(&rule["operations"]), op.as_str())
        && any(strings(&rule["apiGroups"]), &def.group)
        && any(strings(&rule["apiVersions"]), &def.version)
        && resource_ok
        && scope_ok
}

fn selector(hook: &Value, field: &str) -> Result<LabelSelector, ApiError> {
    match hook.get(field) {
        None | Some(Value::Null) => Ok(LabelSelector::default()),
        Some(sel) => LabelSelector::from_structured(sel)
            .map_err(|e| ApiError::internal(format!("webhook {field}: {e}"))),
    }
}

fn matches(
    hook: &Value,
    def: &ResourceDef,
    subresource: Option<&str>,
    op: Operation,
    ns_labels: Option<&Value>,
    object: Option<&Value>,
    old_object: Option<&Value>,
) -> Result<bool, ApiError> {
    if !hook["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| rule_matches(r, def, subresource, op))
    {
        return Ok(false);
    }
    // Cluster-scoped objects other than namespaces are not filtered by namespaceSelector.
    if let Some(labels) = ns_labels {
        let sel = selector(hook, "namespaceSelector")?;
        let obj = json!({ "metadata": { "labels": labels } });
        if !sel.matches(&obj) {
            return Ok(false);
        }
    }
    let sel = selector(hook, "objectSelector")?;
    if !sel.is_empty()
        && ![object, old_object]
            .into_iter()
            .flatten()
            .any(|o| sel.matches(o))
    {
        return Ok(false);
    }
    if hook
        .get("matchConditions")
        .is_some_and(|m| m.as_array().is_some_and(|a| !a.is_empty()))
    {
        tracing::warn!("kube-emulator ignores webhook matchConditions (no CEL)");
    }
    Ok(true)
}

fn review_request(
    def: &ResourceDef,
    subresource: Option<&str>,
    key: &Key,
    op: Operation,
    object: Option<&Value>,
    old_object: Option<&Value>,
    opts: &WriteOpts,
) -> Value {
    let kind = json!({ "group": def.group, "version": def.version, "kind": def.kind });
    let resource = json!({ "group": def.group, "version": def.version, "resource": def.plural });
    let options_kind = match op {
        Operation::Create => "CreateOptions",
        Operation::Update => "UpdateOptions",
        Operation::Delete => "DeleteOptions",
    };
    let mut options = json!({ "apiVersion": "meta.k8s.io/v1", "kind": options_kind });
    if let Some(fm) = &opts.field_manager {
        options["fieldManager"] = json!(fm);
    }
    if opts.dry_run {
        options["dryRun"] = json!(["All"]);
    }
    let mut request = json!({
        "uid": uuid::Uuid::new_v4().to_string(),
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": key.name,
        "operation": op.as_str(),
        "userInfo": opts.user.to_json(),
        "object": object.cloned().unwrap_or(Value::Null),
        "oldObject": old_object.cloned().unwrap_or(Value::Null),
        "dryRun": opts.dry_run,
        "options": options,
    });
    if def.namespaced {
        request["namespace"] = json!(key.namespace);
    }
    if let Some(sub) = subresource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request })
}

/// Where to send the review: `clientConfig.url`, or a `service` reference resolved through a
/// Service in the store whose `clusterIP` is a loopback address (its `targetPort` is used).
struct Endpoint {
    addr: String,
    server_name: String,
    path: String,
    display: String,
}

fn endpoint(client_config: &Value) -> Result<Endpoint, String> {
    if let Some(url) = client_config["url"].as_str() {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("webhook url {url:?} must use https"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = match authority.rsplit_once(':') {
            Some((h, _)) if !h.ends_with(']') || authority.starts_with('[') => h,
            _ => authority,
        };
        let addr = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:443")
        };
        return Ok(Endpoint {
            addr,
            server_name: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            path: path.to_string(),
            display: url.to_string(),
        });
    }
    Err("webhook clientConfig has neither url nor service".into())
}

fn service_endpoint(shared: &Shared, client_config: &Value) -> Result<Endpoint, String> {
    let svc = &client_config["service"];
    let (Some(ns), Some(name)) = (svc["namespace"].as_str(), svc["name"].as_str()) else {
        return endpoint(client_config);
    };
    let port = svc["port"].as_u64().unwrap_or(443);
    let path = svc["path"].as_str().unwrap_or("/").to_string();
    let service = shared
        .store
        .read()
        .get(&Key::new("", "services", ns, name))
        .cloned()
        .ok_or_else(|| format!("service \"{ns}/{name}\" not found"))?;
    let ip = service["spec"]["clusterIP"]
        .as_str()
        .filter(|ip| ip.starts_with("127.") || *ip == "::1")
        .ok_or_else(|| {
            format!("service {ns}/{name} has no loopback clusterIP for kube-emulator to dial")
        })?;
    let target = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"].as_u64() == Some(port))
        .map(|p| p["targetPort"].as_u64().unwrap_or(port))
        .unwrap_or(port);
    let server_name = format!("{name}.{ns}.svc");
    Ok(Endpoint {
        addr: format!("{ip}:{target}"),
        display: format!("https://{server_name}:{port}{path}"),
        server_name,
        path,
    })
}

async fn call_one(shared: &Shared, hook: &Value, review: Value) -> Result<(), ApiError> {
    let name = hook["name"].as_str().unwrap_or_default();
    let fail_closed = hook["failurePolicy"].as_str() != Some("Ignore");
    let timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30));
    let uid = review["request"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let result = match resolve(shared, hook) {
        Err(e) => Err(e),
        Ok(ep) => match tokio::time::timeout(timeout, post(&ep, hook, &review)).await {
            Ok(r) => r.map_err(|e| format!("failed to call webhook: Post \"{}\": {e}", ep.display)),
            Err(_) => Err(format!(
                "failed to call webhook: Post \"{}\": context deadline exceeded",
                ep.display
            )),
        },
    };
    let response = match result {
        Ok(r) => r,
        Err(e) if fail_closed => {
            return Err(ApiError::internal(format!(
                "failed calling webhook \"{name}\": {e}"
            )));
        }
        Err(e) => {
            tracing::warn!(webhook = name, error = %e, "webhook call failed, ignored by failurePolicy");
            return Ok(());
        }
    };
    let resp = &response["response"];
    if resp["uid"].as_str() != Some(uid.as_str()) {
        let e = format!("received invalid webhook response: expected response.uid={uid:?}");
        return if fail_closed {
            Err(ApiError::internal(format!(
                "failed calling webhook \"{name}\": {e}"
            )))
        } else {
            Ok(())
        };
    }
    if resp["allowed"].as_bool() == Some(true) {
        return Ok(());
    }
    let status = &resp["status"];
    let msg = status["message"].as_str().unwrap_or_default();
    let message = if msg.is_empty() {
        format!("admission webhook \"{name}\" denied the request without explanation")
    } else {
        format!("admission webhook \"{name}\" denied the request: {msg}")
    };
    let code = status["code"]
        .as_u64()
        .filter(|c| (400..600).contains(c))
        .unwrap_or(403) as u16;
    let reason = status["reason"].as_str().unwrap_or_default();
    Err(ApiError::new(code, reason, message))
}

fn resolve(shared: &Shared, hook: &Value) -> Result<Endpoint, String> {
    let cc = &hook["clientConfig"];
    if cc.get("url").is_some() {
        endpoint(cc)
    } else {
        service_endpoint(shared, cc)
    }
}

async fn post(ep: &Endpoint, hook: &Value, review: &Value) -> Result<Value, String> {
    let ca = hook["clientConfig"]["caBundle"]
        .as_str()
        .unwrap_or_default();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(ca.trim())
        .map_err(|e| format!("invalid caBundle: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("invalid caBundle: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("invalid caBundle: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(ep.server_name.clone()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(&ep.addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let body = serde_json::to_vec(review).map_err(|e| e.to_string())?;
    let req = http::Request::post(ep.path.as_str())
        .header(http::header::HOST, ep.server_name.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "expected webhook response of 200, got {}",
            status.as_u16()
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid webhook response: {e}"))
}
