//! Raw HTTP behaviour, checked against the Kubernetes API concepts documentation
//! (https://kubernetes.io/docs/reference/using-api/api-concepts/) and the real response
//! shapes in tests/fixtures/apiserver-corpus/.

mod common;

use common::{assert_shape, cm, corpus, delete, get, patch, post, put, raw};
use serde_json::{Value, json};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

async fn create_cm(addr: std::net::SocketAddr, name: &str, labels: Value) -> Value {
    let r = post(addr, CMS, &cm(name, labels)).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

// "Resource versions": a PUT carrying a stale resourceVersion is a 409 Conflict.
#[tokio::test]
async fn stale_update_conflict_matches_the_corpus() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let created = create_cm(a, "cm-conflict", json!({})).await;
    let mut newer = created.clone();
    newer["data"]["key"] = json!("winner");
    assert_eq!(
        put(a, &format!("{CMS}/cm-conflict"), &newer.to_string())
            .await
            .status,
        200
    );
    let mut loser = created;
    loser["data"]["key"] = json!("loser");
    let r = put(a, &format!("{CMS}/cm-conflict"), &loser.to_string()).await;
    assert_eq!(r.status, 409);
    assert_shape(
        &corpus("configmap/conflict-update/audit.update.yaml")["responseObject"],
        &r.json(),
        "status",
    );
}

#[tokio::test]
async fn not_found_already_exists_and_invalid_have_real_status_bodies() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let r = get(a, &format!("{CMS}/missing")).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "configmaps \"missing\" not found", "reason": "NotFound",
               "details": {"name": "missing", "kind": "configmaps"}, "code": 404})
    );
    create_cm(a, "dup", json!({})).await;
    let r = post(a, CMS, &cm("dup", json!({}))).await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (409, json!("AlreadyExists"))
    );
    let r = post(
        a,
        CMS,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{}}"#,
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["reason"], "Invalid");
    assert_eq!(r.json()["details"]["causes"][0]["field"], "metadata.name");
    let r = post(a, CMS, &cm("Bad_Name", json!({}))).await;
    assert_eq!(r.status, 422);
}

// DELETE returns a Success Status for built-ins, and the object while finalizers hold it.
#[tokio::test]
async fn delete_responses_match_the_corpus() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "cm-child", json!({})).await;
    let r = delete(a, &format!("{CMS}/cm-child")).await;
    assert_eq!(r.status, 200);
    assert_shape(
        &corpus("configmap/owner-ref-cascade/audit.delete.cm-child.yaml")["responseObject"],
        &r.json(),
        "delete",
    );

    let held = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cm-hold", "labels": {"mutationlab.configbutler.ai/scenario": "finalizer-delete"},
                     "finalizers": ["mutationlab.configbutler.ai/hold"]},
        "data": {"key": "value"}});
    assert_eq!(post(a, CMS, &held.to_string()).await.status, 201);
    let r = delete(a, &format!("{CMS}/cm-hold")).await;
    assert_eq!(r.status, 200);
    let mut expected =
        corpus("configmap/finalizer-delete/audit.delete.yaml")["responseObject"].clone();
    expected["metadata"]["namespace"] = json!("default");
    assert_shape(&expected, &r.json(), "finalizer-delete");
}

#[tokio::test]
async fn delete_collection_returns_the_deleted_list_like_the_corpus() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let label = json!({"mutationlab.configbutler.ai/scenario": "deletecollection"});
    for n in ["cm-a", "cm-b", "cm-c"] {
        create_cm(a, n, label.clone()).await;
    }
    create_cm(a, "other", json!({})).await;
    let r = delete(
        a,
        &format!("{CMS}?labelSelector=mutationlab.configbutler.ai%2Fscenario%3Ddeletecollection"),
    )
    .await;
    assert_eq!(r.status, 200);
    let mut expected =
        corpus("configmap/deletecollection/audit.deletecollection.yaml")["responseObject"].clone();
    for item in expected["items"].as_array_mut().unwrap() {
        item["metadata"]["namespace"] = json!("default");
    }
    assert_shape(&expected, &r.json(), "deletecollection");
    assert_eq!(
        get(a, CMS).await.json()["items"].as_array().unwrap().len(),
        1
    );
}

// "Efficient detection of changes": a watch from a resourceVersion replays what happened after it.
#[tokio::test]
async fn watch_replays_history_after_the_requested_resource_version() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let first = create_cm(a, "a", json!({})).await;
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    create_cm(a, "b", json!({})).await;
    patch(
        a,
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        r#"{"data":{"key":"v2"}}"#,
    )
    .await;
    delete(a, &format!("{CMS}/b")).await;
    let mut w = common::watch(a, &format!("{CMS}?watch=true&resourceVersion={rv}")).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = w.next_change().await.unwrap();
        seen.push(format!(
            "{} {}",
            ev["type"].as_str().unwrap(),
            ev["object"]["metadata"]["name"].as_str().unwrap()
        ));
    }
    assert_eq!(seen, ["ADDED b", "MODIFIED a", "DELETED b"]);
}

#[tokio::test]
async fn watch_from_zero_synthesizes_added_events_for_current_state() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "x", json!({})).await;
    let mut w = common::watch(a, &format!("{CMS}?watch=1&resourceVersion=0")).await;
    let ev = w.next_change().await.unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["kind"].as_str()),
        (Some("ADDED"), Some("ConfigMap"))
    );
}

// 410 Gone: a watch from a compacted resourceVersion gets an in-band ERROR event (corpus shape).
#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_expired() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "x", json!({})).await;
    assert_eq!(post(a, "/_emulator/compact", "").await.status, 200);
    let r = get(a, &format!("{CMS}?watch=true&resourceVersion=1")).await;
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(events.len(), 1);
    assert_shape(
        &corpus("configmap/watch-resync/watch.error.yaml"),
        &events[0],
        "error",
    );
    // A consistent list at that resourceVersion is gone too.
    let r = get(
        a,
        &format!("{CMS}?resourceVersion=1&resourceVersionMatch=Exact"),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (410, json!("Expired"))
    );
}

// Streaming lists: initial ADDED events then the k8s.io/initial-events-end BOOKMARK (corpus shape).
#[tokio::test]
async fn streaming_list_ends_with_the_initial_events_end_bookmark() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "x", json!({})).await;
    let mut w = common::watch(
        a,
        &format!("{CMS}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&resourceVersion="),
    )
    .await;
    assert_eq!(w.next().await.unwrap()["type"], "ADDED");
    let bookmark = w.next().await.unwrap();
    assert_shape(
        &corpus("configmap/watch-bookmark/watch.bookmark.yaml"),
        &bookmark,
        "bookmark",
    );
    // Without bookmarks the request is invalid, as upstream.
    let r = get(
        a,
        &format!("{CMS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"),
    )
    .await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn idle_watches_get_periodic_bookmarks_with_the_current_resource_version() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emu = kube_emulator::Emulator::builder()
        .bookmark_interval(std::time::Duration::from_millis(50))
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let a = emu.addr();
    let created = create_cm(a, "x", json!({})).await;
    let mut w = common::watch(
        a,
        &format!("{CMS}?watch=true&allowWatchBookmarks=true&resourceVersion=1"),
    )
    .await;
    let mut ev = w.next().await.unwrap();
    while ev["type"] != "BOOKMARK" {
        ev = w.next().await.unwrap();
    }
    assert_eq!(
        ev["object"]["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
    assert_eq!(ev["object"]["kind"], "ConfigMap");
}

#[tokio::test]
async fn label_selector_watch_sees_objects_leave_and_enter_the_selection() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "x", json!({"app": "web"})).await;
    let rv = emu.resource_version();
    let mut w = common::watch(
        a,
        &format!("{CMS}?watch=true&labelSelector=app%3Dweb&resourceVersion={rv}"),
    )
    .await;
    patch(
        a,
        &format!("{CMS}/x"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"app":"db"}}}"#,
    )
    .await;
    patch(
        a,
        &format!("{CMS}/x"),
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"app":"web"}}}"#,
    )
    .await;
    assert_eq!(w.next_change().await.unwrap()["type"], "DELETED");
    assert_eq!(w.next_change().await.unwrap()["type"], "ADDED");
}

#[tokio::test]
async fn single_object_watches_see_only_that_object() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let rv = emu.resource_version();
    let mut by_path = common::watch(
        a,
        &format!("/api/v1/watch/namespaces/default/configmaps/two?resourceVersion={rv}"),
    )
    .await;
    let mut by_field = common::watch(
        a,
        &format!("{CMS}?watch=true&fieldSelector=metadata.name%3Dtwo&resourceVersion={rv}"),
    )
    .await;
    create_cm(a, "one", json!({})).await;
    create_cm(a, "two", json!({})).await;
    for w in [&mut by_path, &mut by_field] {
        let ev = w.next_change().await.unwrap();
        assert_eq!(ev["object"]["metadata"]["name"], "two");
    }
}

#[tokio::test]
async fn watch_ends_when_timeout_seconds_elapse() {
    let emu = common::emulator().await;
    let r = get(
        emu.addr(),
        &format!("{CMS}?watch=true&timeoutSeconds=1&resourceVersion=0"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.events().is_empty());
}

// "Resource versions" for LIST: Exact serves an older state; too new is a 504; NotOlderThan is current.
#[tokio::test]
async fn list_honours_resource_version_match() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "a", json!({})).await;
    let at = emu.resource_version();
    create_cm(a, "b", json!({})).await;
    let r = get(
        a,
        &format!("{CMS}?resourceVersion={at}&resourceVersionMatch=Exact"),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["kind"], "ConfigMapList");
    assert_eq!(body["metadata"]["resourceVersion"], at.to_string());
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert!(
        body["items"][0].get("kind").is_none(),
        "built-in list items carry no kind"
    );
    let r = get(
        a,
        &format!("{CMS}?resourceVersion={at}&resourceVersionMatch=NotOlderThan"),
    )
    .await;
    assert_eq!(r.json()["items"].as_array().unwrap().len(), 2);
    let r = get(a, &format!("{CMS}?resourceVersion=999999")).await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (504, json!("Timeout"))
    );
    let r = get(a, &format!("{CMS}?resourceVersionMatch=Exact")).await;
    assert_eq!(r.status, 400);
}

// Unsupported requests fail loudly instead of being ignored.
#[tokio::test]
async fn unsupported_requests_fail_loudly() {
    let emu = common::emulator().await;
    let a = emu.addr();
    create_cm(a, "x", json!({})).await;
    let proto = raw(
        a,
        "POST",
        CMS,
        &[("content-type", "application/vnd.kubernetes.protobuf")],
        "\u{0}k8s",
    )
    .await;
    assert_eq!(
        (proto.status, proto.json()["reason"].clone()),
        (415, json!("UnsupportedMediaType"))
    );
    let only_proto = raw(
        a,
        "GET",
        CMS,
        &[("accept", "application/vnd.kubernetes.protobuf")],
        "",
    )
    .await;
    assert_eq!(only_proto.status, 406);
    let table_only = raw(
        a,
        "GET",
        CMS,
        &[("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")],
        "",
    )
    .await;
    assert_eq!(table_only.status, 406);
    let cbor = patch(a, &format!("{CMS}/x"), "application/apply-patch+cbor", "{}").await;
    assert_eq!(cbor.status, 415);
    let scale = get(a, "/apis/apps/v1/namespaces/default/deployments/x/scale").await;
    assert_eq!(scale.status, 501);
    let field = get(a, &format!("{CMS}?fieldSelector=status.phase%3DRunning")).await;
    assert_eq!(field.status, 400);
    let label = get(a, &format!("{CMS}?labelSelector=a%20in%20b")).await;
    assert_eq!(label.status, 400);
    let post_named = post(a, &format!("{CMS}/x"), &cm("x", json!({}))).await;
    assert_eq!(
        (post_named.status, post_named.json()["reason"].clone()),
        (405, json!("MethodNotAllowed"))
    );
    let unknown = get(a, "/apis/nope.example.com/v1/things").await;
    assert_eq!(unknown.status, 404);
    let dry = post(a, &format!("{CMS}?dryRun=Some"), &cm("y", json!({}))).await;
    assert_eq!(dry.status, 400);
}

// Preconditions: a resourceVersion in a patch, or DeleteOptions.preconditions, must match.
#[tokio::test]
async fn resource_version_and_uid_preconditions_conflict_when_stale() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let created = create_cm(a, "x", json!({})).await;
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap();
    let ok = patch(
        a,
        &format!("{CMS}/x"),
        "application/merge-patch+json",
        &json!({"metadata": {"resourceVersion": rv}, "data": {"key": "2"}}).to_string(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let stale = patch(
        a,
        &format!("{CMS}/x"),
        "application/merge-patch+json",
        &json!({"metadata": {"resourceVersion": rv}, "data": {"key": "3"}}).to_string(),
    )
    .await;
    assert_eq!(stale.status, 409);
    let r = raw(
        a,
        "DELETE",
        &format!("{CMS}/x"),
        &[],
        r#"{"preconditions":{"uid":"not-it"}}"#,
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("Precondition failed: UID in precondition")
    );
    let r = raw(
        a,
        "DELETE",
        &format!("{CMS}/x"),
        &[],
        &json!({"preconditions": {"resourceVersion": rv}}).to_string(),
    )
    .await;
    assert_eq!(r.status, 409);
}

#[tokio::test]
async fn no_op_update_keeps_the_resource_version() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let created = create_cm(a, "x", json!({})).await;
    let r = put(a, &format!("{CMS}/x"), &created.to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["metadata"]["resourceVersion"],
        created["metadata"]["resourceVersion"]
    );
}

// Status subresource: PUT on the object keeps status; PUT on /status changes only status.
#[tokio::test]
async fn status_subresource_separates_spec_and_status_writes() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let path = "/apis/apps/v1/namespaces/default/deployments";
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}});
    let created = post(a, path, &d.to_string()).await.json();
    assert_eq!(created["metadata"]["generation"], 1);
    let mut with_status = created.clone();
    with_status["status"] = json!({"replicas": 1});
    with_status["spec"]["replicas"] = json!(5);
    let st = put(a, &format!("{path}/web/status"), &with_status.to_string())
        .await
        .json();
    assert_eq!(
        (
            st["status"]["replicas"].clone(),
            st["spec"]["replicas"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_eq!(st["metadata"]["generation"], 1);
    let mut spec = st.clone();
    spec["spec"]["replicas"] = json!(3);
    spec["status"] = json!({"replicas": 99});
    let up = put(a, &format!("{path}/web"), &spec.to_string())
        .await
        .json();
    assert_eq!(
        (
            up["status"]["replicas"].clone(),
            up["spec"]["replicas"].clone()
        ),
        (json!(1), json!(3))
    );
    assert_eq!(up["metadata"]["generation"], 2);
}

// Strategic merge patch is approximated: named lists merge by name.
#[tokio::test]
async fn strategic_merge_patch_merges_containers_by_name() {
    let emu = common::emulator().await;
    let a = emu.addr();
    let path = "/api/v1/namespaces/default/pods";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}});
    assert_eq!(post(a, path, &pod.to_string()).await.status, 201);
    let r = patch(
        a,
        &format!("{path}/p"),
        "application/strategic-merge-patch+json",
        r#"{"spec":{"containers":[{"name":"b","image":"b:2"}]}}"#,
    )
    .await;
    let body = r.json();
    let images: Vec<&str> = body["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect();
    assert_eq!(images, ["a:1", "b:2"]);
}

// Identity: bearer tokens map to users; impersonation headers override (kubectl auth whoami).
#[tokio::test]
async fn self_subject_review_reports_token_and_impersonated_users() {
    let emu = common::emulator().await;
    emu.add_token("t0k3n", "alice", &["devs"]);
    let a = emu.addr();
    let path = "/apis/authentication.k8s.io/v1/selfsubjectreviews";
    let body = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let r = raw(a, "POST", path, &[("authorization", "Bearer t0k3n")], body).await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.json()["status"]["userInfo"],
        json!({"username": "alice", "groups": ["devs", "system:authenticated"]})
    );
    let r = raw(
        a,
        "POST",
        path,
        &[("impersonate-user", "bob"), ("impersonate-group", "ops")],
        body,
    )
    .await;
    assert_eq!(r.json()["status"]["userInfo"]["username"], "bob");
    let r = raw(a, "POST", path, &[("authorization", "Bearer wrong")], body).await;
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (401, json!("Unauthorized"))
    );
}

#[tokio::test]
async fn discovery_documents_have_the_upstream_shapes() {
    let emu = common::emulator().await;
    let a = emu.addr();
    assert_eq!(get(a, "/version").await.json()["major"], "1");
    assert_eq!(get(a, "/api").await.json()["versions"], json!(["v1"]));
    let groups = get(a, "/apis").await.json();
    assert_eq!(groups["kind"], "APIGroupList");
    let apps = get(a, "/apis/apps").await.json();
    assert_eq!(apps["preferredVersion"]["groupVersion"], "apps/v1");
    let v1 = get(a, "/api/v1").await.json();
    let cm = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "configmaps")
        .unwrap()
        .clone();
    assert_eq!(cm["shortNames"], json!(["cm"]));
    let accept =
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
    let agg = raw(a, "GET", "/apis", &[("accept", accept)], "").await;
    assert_eq!(
        agg.headers["content-type"],
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    assert_eq!(agg.json()["kind"], "APIGroupDiscoveryList");
}
