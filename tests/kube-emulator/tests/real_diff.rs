//! The emulator diffed against the real kube-apiserver v1.37.2 (`testkit::RealCluster`): the same
//! requests go to both, through the same kube-rs client, and their outcomes (status code, reason,
//! and what was stored) are compared. Every outcome must be equal, except the differences the
//! README lists under "What it deliberately does not emulate"; for those the real server's answer
//! is asserted too, so the list stays true.
//!
//! One real cluster for all checks (it takes tens of seconds to start). Needs the real control
//! plane (`scripts/build-real-kube.sh`); fails loudly without it.

use bytes::Bytes;
use http_body_util::BodyExt;
use kube_emulator::Emulator;
use serde_json::{Value, json};
use testkit::RealCluster;

/// What one request did: status code, `reason` of a `Status` body (or `-`), and a field of the
/// answer picked by the check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome(u16, String, String);

async fn send(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("accept", "application/json")
        .body(kube::client::Body::from(body))
        .unwrap();
    let response = client.send(request).await.expect("a response");
    let status = response.status().as_u16();
    let bytes: Bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

async fn json(client: &kube::Client, method: &str, path: &str, body: Value) -> (u16, Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    send(client, method, path, "application/json", bytes).await
}

fn reason(body: &Value) -> String {
    if body["kind"] == "Status" {
        body["reason"].as_str().unwrap_or("-").to_owned()
    } else {
        "-".to_owned()
    }
}

const CM: &str = "/api/v1/namespaces/default/configmaps";

/// The checks, each run once per backend (`tag` keeps their objects apart).
async fn outcomes(client: &kube::Client, tag: &str) -> Vec<(&'static str, Outcome)> {
    let mut out = Vec::new();

    // A name that is not a DNS subdomain, percent-encoded in the URL.
    let (code, body) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "space name"}}),
    )
    .await;
    out.push((
        "create named `space name`",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(client, "GET", &format!("{CM}/space%20name"), Value::Null).await;
    out.push((
        "get `space%20name`",
        Outcome(
            code,
            reason(&body),
            body["details"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
    ));
    // A valid name, percent-encoded in the URL: the server decodes path segments.
    let name = format!("enc-{tag}");
    let (code, _) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}}),
    )
    .await;
    assert_eq!(code, 201);
    let encoded: String = name.chars().map(|c| format!("%{:02X}", c as u32)).collect();
    let (code, body) = json(client, "GET", &format!("{CM}/{encoded}"), Value::Null).await;
    out.push((
        "get a name percent-encoded in full",
        Outcome(
            code,
            reason(&body),
            body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .replace(tag, "TAG"),
        ),
    ));

    // ConfigMap data values must be strings.
    let (code, body) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("num-{tag}")}, "data": {"n": 1000}}),
    )
    .await;
    out.push((
        "ConfigMap data value a number",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(
        client,
        "POST",
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("sec-{tag}")}, "stringData": {"n": true}}),
    )
    .await;
    out.push((
        "Secret stringData value a boolean",
        Outcome(code, reason(&body), String::new()),
    ));

    // A Secret's data is capped at 1 MiB (decoded).
    let big = "A".repeat(1536 * 1024);
    let (code, body) = json(
        client,
        "POST",
        "/api/v1/namespaces/default/secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("big-{tag}")}, "data": {"blob": big}}),
    )
    .await;
    out.push((
        "a Secret with 1.1 MiB of data",
        Outcome(code, reason(&body), String::new()),
    ));

    // Plain errors.
    let (code, body) = json(client, "GET", &format!("{CM}/missing-{tag}"), Value::Null).await;
    out.push((
        "get a missing object",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
    )
    .await;
    out.push((
        "create an existing name",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(
        client,
        "PUT",
        &format!("{CM}/{name}"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "resourceVersion": "1"}, "data": {"k": "w"}}),
    )
    .await;
    out.push((
        "update with a stale resourceVersion",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(
        client,
        "PUT",
        &format!("{CM}/{name}"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"k": "w"}}),
    )
    .await;
    out.push((
        "update whose body names another object",
        Outcome(code, reason(&body), String::new()),
    ));
    let (code, body) = json(
        client,
        "GET",
        "/api/v1/namespaces/default/widgets",
        Value::Null,
    )
    .await;
    out.push((
        "an unknown resource",
        Outcome(code, reason(&body), String::new()),
    ));

    // A list: its kind and resourceVersion, and a continue token with more to come (two objects of
    // the test's own at least; a real cluster also has `kube-root-ca.crt`).
    let (code, _) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("second-{tag}")}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = json(client, "GET", &format!("{CM}?limit=1"), Value::Null).await;
    out.push((
        "list with limit=1",
        Outcome(
            code,
            body["kind"].as_str().unwrap_or_default().to_owned(),
            format!(
                "items={} rv={} continue={}",
                body["items"].as_array().map(Vec::len).unwrap_or(0),
                body["metadata"]["resourceVersion"].is_string(),
                body["metadata"]["continue"].is_string()
            ),
        ),
    ));

    // Selectors: a supported and an unsupported field.
    let (code, body) = json(
        client,
        "GET",
        &format!("{CM}?fieldSelector=metadata.name%3D{name}"),
        Value::Null,
    )
    .await;
    out.push((
        "list by metadata.name",
        Outcome(
            code,
            reason(&body),
            format!(
                "items={}",
                body["items"].as_array().map(Vec::len).unwrap_or(0)
            ),
        ),
    ));
    let (code, body) = json(
        client,
        "GET",
        &format!("{CM}?fieldSelector=data.k%3Dv"),
        Value::Null,
    )
    .await;
    out.push((
        "list by an unsupported field",
        Outcome(code, reason(&body), String::new()),
    ));

    // A dry run stores nothing; generateName makes a name; a missing namespace is NotFound.
    let (code, _) = json(
        client,
        "POST",
        &format!("{CM}?dryRun=All"),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("dry-{tag}")}}),
    )
    .await;
    let (after, _) = json(client, "GET", &format!("{CM}/dry-{tag}"), Value::Null).await;
    out.push((
        "dry-run create, then get",
        Outcome(code, after.to_string(), String::new()),
    ));
    let (code, body) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}}),
    )
    .await;
    out.push((
        "create with generateName",
        Outcome(
            code,
            reason(&body),
            format!(
                "{}",
                body["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.len() == 9 && n.starts_with("gen-"))
            ),
        ),
    ));
    let (code, body) = json(
        client,
        "POST",
        "/api/v1/namespaces/nowhere/configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}),
    )
    .await;
    out.push((
        "create in a missing namespace",
        Outcome(code, reason(&body), String::new()),
    ));

    // Server-side apply needs a field manager.
    let (code, body) = send(
        client,
        "PATCH",
        &format!("{CM}/{name}"),
        "application/apply-patch+yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".to_vec(),
    )
    .await;
    out.push((
        "apply without fieldManager",
        Outcome(code, reason(&body), String::new()),
    ));

    // An immutable ConfigMap keeps its data.
    let frozen = format!("frozen-{tag}");
    let (code, _) = json(
        client,
        "POST",
        CM,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": frozen}, "data": {"k": "v"}, "immutable": true}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = send(
        client,
        "PATCH",
        &format!("{CM}/{frozen}"),
        "application/merge-patch+json",
        br#"{"data": {"k": "w"}}"#.to_vec(),
    )
    .await;
    out.push((
        "change an immutable ConfigMap",
        Outcome(code, reason(&body), String::new()),
    ));

    // Deleting answers with a Status (nothing holds the object back).
    let (code, body) = json(client, "DELETE", &format!("{CM}/{name}"), Value::Null).await;
    out.push((
        "delete",
        Outcome(
            code,
            body["kind"].as_str().unwrap_or_default().to_owned(),
            body["status"].as_str().unwrap_or_default().to_owned(),
        ),
    ));

    // The /scale subresource of a Deployment.
    let deploy = format!("web-{tag}");
    let (code, _) = json(
        client,
        "POST",
        "/apis/apps/v1/namespaces/default/deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": deploy},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = json(
        client,
        "GET",
        &format!("/apis/apps/v1/namespaces/default/deployments/{deploy}/scale"),
        Value::Null,
    )
    .await;
    out.push((
        "get deployments/scale",
        Outcome(code, reason(&body), format!("{}", body["spec"]["replicas"])),
    ));

    // A protobuf body (kubectl create sends them): the real server decodes it.
    let (code, body) = send(
        client,
        "POST",
        CM,
        "application/vnd.kubernetes.protobuf",
        protobuf_configmap(&format!("pb-{tag}")),
    )
    .await;
    out.push((
        "a protobuf request body",
        Outcome(code, reason(&body), String::new()),
    ));
    out
}

/// A length-delimited protobuf field.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128, "one-byte lengths only");
    let mut out = vec![(number << 3) | 2, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// `ConfigMap{metadata: {name}}` in the Kubernetes protobuf envelope (`k8s\0` + `runtime.Unknown`).
fn protobuf_configmap(name: &str) -> Vec<u8> {
    let configmap = field(1, &field(1, name.as_bytes()));
    let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
    let unknown = [field(1, &type_meta), field(2, &configmap)].concat();
    [b"k8s\0".to_vec(), unknown].concat()
}

/// Checks whose outcomes differ on purpose (README, "What it deliberately does not emulate").
const NOT_EMULATED: &[&str] = &["get deployments/scale", "a protobuf request body"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_answers_like_the_real_api_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts");
    let real = RealCluster::builder().start().await;
    let real_client = {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&real.kubeconfig_yaml(None)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    };
    let emulated = outcomes(&emulator.client().await, "emu").await;
    let actual = outcomes(&real_client, "real").await;
    let mut differences = Vec::new();
    for ((check, e), (_, r)) in emulated.iter().zip(&actual) {
        println!("{check}: emulator {e:?}, real {r:?}");
        if e != r && !NOT_EMULATED.contains(check) {
            differences.push(format!("{check}: emulator {e:?}, real {r:?}"));
        }
    }
    // The documented differences are what the README says they are.
    let find = |outcomes: &[(&str, Outcome)], check: &str| {
        outcomes
            .iter()
            .find(|(c, _)| *c == check)
            .unwrap()
            .1
            .clone()
    };
    assert_eq!(
        find(&actual, "get deployments/scale"),
        Outcome(200, "-".into(), "2".into())
    );
    assert_eq!(
        find(&emulated, "get deployments/scale").0,
        501,
        "/scale is not emulated"
    );
    assert_eq!(find(&actual, "a protobuf request body").0, 201);
    assert_eq!(
        find(&emulated, "a protobuf request body"),
        Outcome(415, "UnsupportedMediaType".into(), String::new())
    );
    assert!(
        differences.is_empty(),
        "the emulator differs from the real API server:\n{}",
        differences.join("\n")
    );
    emulator.shutdown().await;
    tokio::task::spawn_blocking(move || drop(real))
        .await
        .unwrap();
}
