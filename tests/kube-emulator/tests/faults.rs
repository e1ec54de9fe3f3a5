//! Every fault hook, through the Rust API and the `/_emulator/` HTTP endpoints.

mod common;

use std::time::{Duration, Instant};

use common::{cm, get, post, raw};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use kube::discovery::Discovery;
use serde_json::json;

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test]
async fn fail_next_fails_exactly_n_requests_of_that_resource() {
    let emu = common::emulator().await;
    let a = emu.addr();
    emu.faults().fail_next("configmaps", 2, 500);
    assert_eq!(
        get(a, "/api/v1/namespaces/default/secrets").await.status,
        200,
        "other resources unaffected"
    );
    assert_eq!(get(a, CMS).await.status, 500);
    assert_eq!(get(a, CMS).await.status, 500);
    assert_eq!(get(a, CMS).await.status, 200);
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after_over_http() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let r = post(
        a,
        "/_emulator/fail?resource=leases.coordination.k8s.io&count=1&code=429",
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let r = get(a, path).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["reason"], "TooManyRequests");
    assert_eq!(get(a, path).await.status, 200);
}

#[tokio::test]
async fn forbid_denies_a_resource_like_rbac_until_allowed() {
    let emu = common::emulator().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(emu.client().await);
    emu.faults().forbid("configmaps");
    match cms.list(&ListParams::default()).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
            assert_eq!(
                s.message,
                "configmaps is forbidden: User \"system:admin\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\""
            );
        }
        e => panic!("expected 403, got {e:?}"),
    }
    emu.faults().allow("configmaps");
    cms.list(&ListParams::default()).await.unwrap();
    // And over HTTP.
    post(emu.addr(), "/_emulator/forbid?resource=configmaps", "").await;
    assert_eq!(get(emu.addr(), CMS).await.status, 403);
    post(emu.addr(), "/_emulator/allow?resource=configmaps", "").await;
    assert_eq!(get(emu.addr(), CMS).await.status, 200);
}

#[tokio::test]
async fn delay_holds_every_response_back_at_least_that_long() {
    let emu = common::emulator().await;
    let a = emu.addr();
    post(a, "/_emulator/delay?ms=300", "").await;
    let started = Instant::now();
    assert_eq!(get(a, CMS).await.status, 200);
    // A lower bound only: the response cannot come before the injected delay.
    assert!(started.elapsed() >= Duration::from_millis(300));
    emu.faults().set_delay(Duration::ZERO);
    assert_eq!(get(a, CMS).await.status, 200);
}

#[tokio::test]
async fn hidden_group_blinks_out_of_both_discovery_flavours() {
    let emu = common::emulator().await;
    let client = emu.client().await;
    emu.faults().hide_group("apps", Duration::from_secs(3600));
    let legacy = Discovery::new(client.clone()).run().await.unwrap();
    assert!(!legacy.has_group("apps"));
    assert!(legacy.has_group("batch"));
    let aggregated = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(!aggregated.has_group("apps"));
    assert_eq!(get(emu.addr(), "/apis/apps/v1").await.status, 404);
    // Its resources are still served.
    assert_eq!(
        get(emu.addr(), "/apis/apps/v1/namespaces/default/deployments")
            .await
            .status,
        200
    );
    post(emu.addr(), "/_emulator/unhide-group?group=apps", "").await;
    assert!(
        Discovery::new(client)
            .run_aggregated()
            .await
            .unwrap()
            .has_group("apps")
    );
    // A hide with a duration ends by itself.
    emu.faults().hide_group("batch", Duration::ZERO);
    assert_eq!(get(emu.addr(), "/apis/batch/v1").await.status, 200);
}

#[tokio::test]
async fn close_watches_ends_open_streams() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let mut w = common::watch(a, &format!("{CMS}?watch=true&resourceVersion=0")).await;
    let r = post(a, CMS, &cm("x", json!({}))).await;
    assert_eq!(r.status, 201);
    assert_eq!(w.next_change().await.unwrap()["type"], "ADDED");
    assert_eq!(post(a, "/_emulator/close-watches", "").await.status, 200);
    assert!(w.next_change().await.is_none(), "the stream ended");
}

#[tokio::test]
async fn compaction_expires_resumes_but_keeps_caught_up_watches_open() {
    let emu = common::emulator().await;
    let a = emu.addr();
    post(a, CMS, &cm("x", json!({}))).await;
    let rv = emu.resource_version();
    let mut open = common::watch(a, &format!("{CMS}?watch=true&resourceVersion={rv}")).await;
    emu.faults().compact_history();
    post(a, CMS, &cm("y", json!({}))).await;
    let ev = open.next_change().await.unwrap();
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("y"))
    );
    let resumed = get(a, &format!("{CMS}?watch=true&resourceVersion={rv}")).await;
    assert_eq!(resumed.events()[0]["object"]["code"], 410);
}

#[tokio::test]
async fn stats_and_reset_endpoints_work() {
    let emu = common::emulator().await;
    let a = emu.addr();
    emu.faults().fail_next("configmaps", 5, 500);
    emu.faults().forbid("secrets");
    assert_eq!(post(a, "/_emulator/reset", "").await.status, 200);
    assert_eq!(get(a, CMS).await.status, 200);
    assert_eq!(
        get(a, "/api/v1/namespaces/default/secrets").await.status,
        200
    );
    let stats = get(a, "/_emulator/stats").await.json();
    assert_eq!(stats["objects"], 4, "the four default namespaces");
    assert_eq!(raw(a, "POST", "/_emulator/nope", &[], "").await.status, 404);
}
