//! Validating admission webhooks called over HTTPS with a real AdmissionReview
//! (https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::{assert_shape, cm, corpus, delete, post, put, raw};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const CMS: &str = "/api/v1/namespaces/default/configmaps";
const VWCS: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";

#[derive(Clone, Copy)]
enum Answer {
    Allow,
    Deny,
    Hang,
}

/// An HTTPS webhook server with a certificate for 127.0.0.1 and `hook.webhooks.svc`,
/// recording every AdmissionReview it receives.
struct Hook {
    addr: SocketAddr,
    ca_bundle: String,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    async fn start(answer: Answer) -> Hook {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "hook.webhooks.svc".to_string(),
        ])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let recorded = recorded.clone();
                            async move {
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let review: Value = serde_json::from_slice(&body).unwrap();
                                recorded.lock().unwrap().push(review.clone());
                                let uid = review["request"]["uid"].clone();
                                let response = match answer {
                                    Answer::Allow => json!({"uid": uid, "allowed": true}),
                                    Answer::Deny => json!({"uid": uid, "allowed": false,
                                    "status": {"message": "rejected by mutation-capture-lab record-and-reject policy"}}),
                                    Answer::Hang => {
                                        tokio::time::sleep(Duration::from_secs(3600)).await;
                                        json!({})
                                    }
                                };
                                let out = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
                                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                    out.to_string(),
                                ))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Hook {
            addr,
            ca_bundle: base64::engine::general_purpose::STANDARD.encode(ca_cert.pem()),
            seen,
        }
    }

    fn reviews(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }

    fn config(&self, name: &str, webhook: Value) -> String {
        let mut hook = json!({
            "name": name,
            "clientConfig": {"url": format!("https://{}/validate", self.addr), "caBundle": self.ca_bundle},
            "rules": [{"operations": ["CREATE", "UPDATE", "DELETE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
        });
        for (k, v) in webhook.as_object().unwrap() {
            hook[k] = v.clone();
        }
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
               "metadata": {"name": name}, "webhooks": [hook]})
        .to_string()
    }
}

async fn register(addr: SocketAddr, config: String) {
    let r = post(addr, VWCS, &config).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn webhook_receives_admission_reviews_like_the_corpus_with_the_token_user() {
    let hook = Hook::start(Answer::Allow).await;
    let emu = common::emulator().await;
    emu.add_token("writer-token", "alice", &["devs"]);
    let a = emu.addr();
    register(a, hook.config("validate-all.configbutler.ai", json!({}))).await;
    let auth = [("authorization", "Bearer writer-token")];
    let body = cm(
        "cm-a",
        json!({"mutationlab.configbutler.ai/scenario": "create-succeeds"}),
    );
    let created = raw(a, "POST", CMS, &auth, &body).await;
    assert_eq!(created.status, 201);

    let reviews = hook.reviews();
    assert_eq!(reviews.len(), 1);
    assert_eq!(reviews[0]["apiVersion"], "admission.k8s.io/v1");
    let mut expected = corpus("configmap/create-succeeds/admission.create.yaml")["request"].clone();
    expected["userInfo"] = json!({"username": "alice", "groups": ["devs", "system:authenticated"]});
    assert_shape(&expected, &reviews[0]["request"], "request");

    // UPDATE carries oldObject; DELETE carries only oldObject; dry runs say so.
    let mut changed = created.json();
    changed["data"]["key"] = json!("v2");
    assert_eq!(
        raw(
            a,
            "PUT",
            &format!("{CMS}/cm-a?dryRun=All"),
            &auth,
            &changed.to_string()
        )
        .await
        .status,
        200
    );
    assert_eq!(
        put(a, &format!("{CMS}/cm-a"), &changed.to_string())
            .await
            .status,
        200
    );
    assert_eq!(delete(a, &format!("{CMS}/cm-a")).await.status, 200);
    let reviews = hook.reviews();
    let ops: Vec<(&str, bool)> = reviews
        .iter()
        .map(|r| {
            (
                r["request"]["operation"].as_str().unwrap(),
                r["request"]["dryRun"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("CREATE", false),
            ("UPDATE", true),
            ("UPDATE", false),
            ("DELETE", false)
        ]
    );
    assert_eq!(reviews[2]["request"]["oldObject"]["data"]["key"], "value");
    assert_eq!(reviews[2]["request"]["object"]["data"]["key"], "v2");
    assert_eq!(
        reviews[2]["request"]["userInfo"]["username"],
        "system:admin"
    );
    assert_eq!(reviews[3]["request"]["object"], Value::Null);
    assert_eq!(reviews[3]["request"]["options"]["kind"], "DeleteOptions");
}

#[tokio::test]
async fn denial_is_a_403_shaped_like_the_corpus_and_nothing_is_stored() {
    let hook = Hook::start(Answer::Deny).await;
    let emu = common::emulator().await;
    let a = emu.addr();
    register(a, hook.config("validate-all.configbutler.ai", json!({}))).await;
    let r = raw(
        a,
        "POST",
        CMS,
        &[("impersonate-user", "mallory")],
        &cm("cm-a", json!({})),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_shape(
        &corpus("configmap/record-and-reject/audit.create.yaml")["responseObject"],
        &r.json(),
        "denied",
    );
    assert_eq!(
        hook.reviews()[0]["request"]["userInfo"]["username"],
        "mallory"
    );
    assert_eq!(common::get(a, &format!("{CMS}/cm-a")).await.status, 404);
}

#[tokio::test]
async fn failure_policy_decides_what_an_unreachable_webhook_means() {
    let emu = common::emulator().await;
    let a = emu.addr();
    // Nothing listens on port 9 of loopback.
    let dead = |name: &str, policy: &str, resources: &str| {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{"name": name, "failurePolicy": policy,
                "clientConfig": {"url": "https://127.0.0.1:9/validate", "caBundle": ""},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": [resources]}],
                "admissionReviewVersions": ["v1"], "sideEffects": "None"}]})
        .to_string()
    };
    register(a, dead("ignore.example.com", "Ignore", "configmaps")).await;
    assert_eq!(post(a, CMS, &cm("passes", json!({}))).await.status, 201);
    register(a, dead("fail.example.com", "Fail", "secrets")).await;
    let secret = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}}"#;
    let r = post(a, "/api/v1/namespaces/default/secrets", secret).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["reason"], "InternalError");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("failed calling webhook \"fail.example.com\"")
    );
}

#[tokio::test]
async fn webhook_timeouts_fail_or_are_ignored_per_policy() {
    let hook = Hook::start(Answer::Hang).await;
    let emu = common::emulator().await;
    let a = emu.addr();
    register(
        a,
        hook.config(
            "slow-fail.example.com",
            json!({"timeoutSeconds": 1, "failurePolicy": "Fail",
        "objectSelector": {"matchLabels": {"policy": "fail"}}}),
        ),
    )
    .await;
    register(
        a,
        hook.config(
            "slow-ignore.example.com",
            json!({"timeoutSeconds": 1, "failurePolicy": "Ignore",
        "objectSelector": {"matchLabels": {"policy": "ignore"}}}),
        ),
    )
    .await;
    let r = post(a, CMS, &cm("a", json!({"policy": "fail"}))).await;
    assert_eq!(r.status, 500);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("context deadline exceeded")
    );
    assert_eq!(
        post(a, CMS, &cm("b", json!({"policy": "ignore"})))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn rules_and_selectors_choose_which_requests_reach_the_webhook() {
    let hook = Hook::start(Answer::Allow).await;
    let emu = common::emulator().await;
    let a = emu.addr();
    let ns = |name: &str, labels: Value| {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}).to_string()
    };
    assert_eq!(
        post(
            a,
            "/api/v1/namespaces",
            &ns("watched", json!({"audit": "on"}))
        )
        .await
        .status,
        201
    );
    assert_eq!(
        post(a, "/api/v1/namespaces", &ns("quiet", json!({})))
            .await
            .status,
        201
    );
    register(a, hook.config("selective.example.com", json!({
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"], "scope": "Namespaced"}],
        "namespaceSelector": {"matchLabels": {"audit": "on"}},
        "objectSelector": {"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]},
    }))).await;
    let in_ns = |n: &str| format!("/api/v1/namespaces/{n}/configmaps");
    assert_eq!(
        post(a, &in_ns("watched"), &cm("seen", json!({})))
            .await
            .status,
        201
    );
    assert_eq!(
        post(a, &in_ns("watched"), &cm("skipped", json!({"skip": "yes"})))
            .await
            .status,
        201
    );
    assert_eq!(
        post(a, &in_ns("quiet"), &cm("other-ns", json!({})))
            .await
            .status,
        201
    );
    assert_eq!(
        delete(a, &format!("{}/seen", in_ns("watched")))
            .await
            .status,
        200,
        "DELETE not in rules"
    );
    let secret = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}}"#;
    assert_eq!(
        post(a, "/api/v1/namespaces/watched/secrets", secret)
            .await
            .status,
        201
    );
    let names: Vec<String> = hook
        .reviews()
        .iter()
        .map(|r| r["request"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["seen"]);
}

#[tokio::test]
async fn service_references_resolve_through_a_loopback_service() {
    let hook = Hook::start(Answer::Allow).await;
    let emu = common::emulator().await;
    let a = emu.addr();
    emu.apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: webhooks}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: hook, namespace: webhooks}}\nspec:\n  clusterIP: 127.0.0.1\n  ports: [{{port: 443, targetPort: {}}}]\n",
        hook.addr.port()
    ))
    .await
    .unwrap();
    let config = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "svc-hook"},
        "webhooks": [{"name": "svc.example.com",
            "clientConfig": {"service": {"namespace": "webhooks", "name": "hook", "path": "/validate"}, "caBundle": hook.ca_bundle},
            "rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"]}],
            "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail"}]});
    register(a, config.to_string()).await;
    assert_eq!(
        post(a, CMS, &cm("via-service", json!({}))).await.status,
        201
    );
    assert_eq!(hook.reviews().len(), 1);
}
