//! The webhook's HTTPS server against real TLS clients: what it answers, what it refuses and
//! that refusals store nothing. Timeouts are set short so the refusals happen quickly; every
//! wait is bounded only to turn a hang into a failure, and no test asserts on durations.

mod webhook_support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reverser_agent::webhook;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webhook_support::{PATIENCE, Server, peer_leaf, post, request, review_body, tls_connect};

const CREATE: &str = "configmap/create-succeeds/admission.create.yaml";

/// Reads until EOF or error; what the server sent before closing.
async fn read_to_close(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open"),
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn answers_an_admission_review_over_tls_and_records_its_fact() {
    let server = Server::start(|_| {}).await;
    let (status, body) = post(server.addr(), &server.pki.ca_pem, review_body(CREATE)).await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        review,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "response": {"uid": "00000000-0000-4000-8000-000000000002", "allowed": true}})
    );
    assert_eq!(server.store.len(), 1);
    let metrics = server.store.metrics();
    assert_eq!(metrics.requests_with("recorded"), 1);
    assert_eq!(metrics.facts.get(), 1);
    assert_eq!(metrics.latency.get_sample_count(), 1);
}

#[tokio::test]
async fn serves_http2_when_the_client_negotiates_it() {
    let server = Server::start(|_| {}).await;
    let tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::post(format!("https://127.0.0.1{}", webhook::PATH))
            .body(Full::new(Bytes::from(review_body(CREATE))))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(server.store.len(), 3);
}

#[tokio::test]
async fn dry_runs_are_allowed_and_leave_no_fact() {
    let server = Server::start(|_| {}).await;
    let (status, body) = post(
        server.addr(),
        &server.pki.ca_pem,
        review_body("configmap/dry-run-create/admission.create.yaml"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert!(server.store.is_empty());
    assert_eq!(server.store.metrics().requests_with("dry_run"), 1);
}

#[tokio::test]
async fn refuses_plain_http_at_the_tls_layer() {
    let server = Server::start(|_| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let body = review_body(CREATE);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        webhook::PATH,
        body.len()
    );
    // The peer may already have closed by the time the body goes out.
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(&body).await;
    let answer = read_to_close(&mut tcp).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // A plain-HTTP client library fails outright.
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(webhook::PATH)
        .header(http::header::HOST, "127.0.0.1")
        .body(Full::new(Bytes::from(review_body(CREATE))))
        .unwrap();
    assert!(sender.send_request(req).await.is_err());
    assert!(server.store.is_empty());
    assert_eq!(server.store.metrics().facts.get(), 0);
}

#[tokio::test]
async fn rejects_an_oversized_body_with_413_and_stores_nothing() {
    let server = Server::start(|c| c.max_body_bytes = 1024).await;
    let (status, body) = post(server.addr(), &server.pki.ca_pem, vec![b' '; 4096]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(String::from_utf8_lossy(&body).contains("1024"));
    // A valid review that is merely too big is refused as well.
    let (status, _) = post(server.addr(), &server.pki.ca_pem, review_body(CREATE)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(server.store.is_empty());
    assert_eq!(server.store.metrics().requests_with("too_large"), 2);
}

#[tokio::test]
async fn rejects_an_oversized_chunked_body_without_a_length_with_413() {
    let server = Server::start(|c| c.max_body_bytes = 1024).await;
    let tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunks = (0..4)
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![b' '; 512]))));
    let req = http::Request::post(webhook::PATH)
        .header(http::header::HOST, "127.0.0.1")
        .body(StreamBody::new(futures::stream::iter(chunks)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(server.store.is_empty());
}

#[tokio::test]
async fn rejects_malformed_reviews_with_400_and_stores_nothing() {
    let server = Server::start(|_| {}).await;
    let request = webhook_support::corpus(CREATE)["request"].clone();
    for body in [
        b"{not json".to_vec(),
        b"".to_vec(),
        json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": request})
            .to_string()
            .into_bytes(),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "Pod", "request": request})
            .to_string()
            .into_bytes(),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
            .to_string()
            .into_bytes(),
    ] {
        let (status, answer) = post(server.addr(), &server.pki.ca_pem, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(!answer.is_empty(), "a 400 says why");
    }
    assert!(server.store.is_empty());
    assert_eq!(server.store.metrics().requests_with("malformed"), 5);
}

#[tokio::test]
async fn answers_other_paths_with_404_and_other_methods_with_405() {
    let server = Server::start(|_| {}).await;
    let (status, _) = request(
        server.addr(),
        &server.pki.ca_pem,
        "POST",
        "/validate",
        review_body(CREATE),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = request(
        server.addr(),
        &server.pki.ca_pem,
        "GET",
        webhook::PATH,
        Vec::new(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(server.store.is_empty());
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_and_stores_nothing() {
    let server = Server::start(|c| c.body_read_timeout = Duration::from_millis(200)).await;
    let mut tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    let body = review_body(CREATE);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        webhook::PATH,
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(&body[..body.len() / 2]).await.unwrap();
    tls.flush().await.unwrap();
    let answer = read_to_close(&mut tls).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(server.store.is_empty());
    assert_eq!(server.store.metrics().requests_with("timeout"), 1);
}

#[tokio::test]
async fn headers_that_stall_close_the_connection() {
    let server = Server::start(|c| c.header_read_timeout = Duration::from_millis(200)).await;
    let mut tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    tls.write_all(b"POST /process-validating-webhook HTTP/1.1\r\nHost: 127")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let answer = read_to_close(&mut tls).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(server.store.is_empty());
}

#[tokio::test]
async fn a_client_that_never_handshakes_is_disconnected() {
    let server = Server::start(|c| c.handshake_timeout = Duration::from_millis(200)).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    assert!(read_to_close(&mut tcp).await.is_empty());
    // The server still serves others.
    let (status, _) = post(server.addr(), &server.pki.ca_pem, review_body(CREATE)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn new_handshakes_see_a_rotated_certificate() {
    let mut server = Server::start(|_| {}).await;
    let first = server.pki.leaf_der.clone();
    let old_conn = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&old_conn), first);

    server.pki.issue("second");
    let second = server.pki.leaf_der.clone();
    assert_ne!(first, second);
    let conn = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&conn), second);
    let (status, _) = post(server.addr(), &server.pki.ca_pem, review_body(CREATE)).await;
    assert_eq!(status, StatusCode::OK);

    // Half a rotation (a new certificate next to the old key) is not served: the last good
    // pair stays until the key arrives too.
    let (cert_pem, key_pem, third) = server.pki.leaf("third");
    std::fs::write(server.pki.cert_file(), &cert_pem).unwrap();
    let conn = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&conn), second);
    std::fs::write(server.pki.key_file(), &key_pem).unwrap();
    let conn = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&conn), third);
    drop(old_conn);
}

#[tokio::test]
async fn refuses_to_start_without_a_loadable_certificate() {
    let pki = webhook_support::Pki::new();
    std::fs::write(pki.key_file(), "not a key").unwrap();
    let store = reverser_agent::webhook::FactStore::new(
        Default::default(),
        reverser_agent::webhook::AttributionMetrics::new().unwrap(),
    );
    let config = webhook::WebhookConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.cert_file(),
        pki.key_file(),
    );
    let error = webhook::spawn(config, store).await.unwrap_err();
    assert!(error.to_string().contains("tls.key"), "{error}");
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let server = Server::start(|_| {}).await;
    let addr = server.addr();
    server.handle.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn answers_many_reviews_on_one_reused_connection() {
    // The API server reuses connections: several reviews on one HTTP/1.1 connection.
    let server = Server::start(|_| {}).await;
    let tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..5 {
        let req = http::Request::post(webhook::PATH)
            .header(http::header::HOST, "127.0.0.1")
            .body(Full::new(Bytes::from(review_body(CREATE))))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let review: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(review["response"]["allowed"], true);
    }
    assert_eq!(server.store.len(), 5);
}

#[tokio::test]
async fn records_a_review_larger_than_the_inline_threshold() {
    // Reviews over 64 KiB are handled on the blocking pool; the answer is the same.
    let server = Server::start(|_| {}).await;
    let mut request = webhook_support::corpus(CREATE)["request"].clone();
    request["object"]["data"]["blob"] = json!("x".repeat(200 * 1024));
    let (status, body) = post(
        server.addr(),
        &server.pki.ca_pem,
        webhook_support::review_of(request),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(server.store.len(), 1);
}

#[tokio::test]
async fn exports_metrics_promtool_accepts() {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "/usr/bin/promtool".into());
    assert!(
        std::path::Path::new(&promtool).exists(),
        "promtool is required for this test (expected at {promtool}; scripts/install-test-deps.sh installs it)"
    );
    let server = Server::start(|_| {}).await;
    let registry =
        prometheus::Registry::new_custom(Some("gitops_reverser_agent".into()), None).unwrap();
    server.store.metrics().register(&registry).unwrap();
    post(server.addr(), &server.pki.ca_pem, review_body(CREATE)).await;
    post(server.addr(), &server.pki.ca_pem, b"nope".to_vec()).await;
    let mut text = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut text,
    )
    .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("gitops_reverser_agent_webhook_requests_total{outcome=\"recorded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("gitops_reverser_agent_attribution_facts_total 1"),
        "{text}"
    );

    let mut child = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small, valid AdmissionReview (a ConfigMap created by `alice`), self-contained.
fn small_review() -> Vec<u8> {
    webhook_support::review_of(json!({
        "uid": "00000000-0000-4000-8000-0000000000aa",
        "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
        "resource": {"group": "", "version": "v1", "resource": "configmaps"},
        "requestKind": {"group": "", "version": "v1", "kind": "ConfigMap"},
        "requestResource": {"group": "", "version": "v1", "resource": "configmaps"},
        "name": "cm-a",
        "namespace": "shop",
        "operation": "CREATE",
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cm-a", "namespace": "shop", "uid": "00000000-0000-4000-8000-0000000000ab"},
                   "data": {"key": "value"}},
        "oldObject": null,
        "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
    }))
}

/// One request over a fresh HTTP/2 connection (ALPN `h2` over TLS), as kube-apiserver sends
/// them: the status and the whole response body, or the client's error.
async fn h2_request(
    server: &Server,
    method: &str,
    path: &str,
    body: Vec<u8>,
    declare_length: bool,
) -> Result<(StatusCode, Bytes), String> {
    let tls = tls_connect(server.addr(), &server.pki.ca_pem, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let builder = http::Request::builder()
        .method(method)
        .uri(format!("https://127.0.0.1{path}"))
        .header(http::header::CONTENT_TYPE, "application/json");
    // Sent in 64 KiB frames; with `declare_length` the length is announced up front.
    let builder = if declare_length {
        builder.header(http::header::CONTENT_LENGTH, body.len())
    } else {
        builder
    };
    let chunks: Vec<_> = body
        .chunks(64 * 1024)
        .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = builder
        .body(StreamBody::new(futures::stream::iter(chunks)))
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("an answer in time")
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .expect("the body in time")
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((status, body))
}

/// kube-apiserver speaks HTTP/2 to webhooks: refusals must arrive as answers there too, never as
/// a reset stream, however much of the body the client is still sending.
#[tokio::test]
async fn http2_refusals_are_answers_not_stream_resets() {
    const MIB: usize = 1024 * 1024;
    let server = Server::start(|_| {}).await;
    let big = vec![b' '; 9 * MIB];
    for round in 0..12 {
        for declare_length in [true, false] {
            let (status, body) = h2_request(
                &server,
                "POST",
                webhook::PATH,
                big.clone(),
                declare_length,
            )
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: 9 MiB over HTTP/2 (length declared: {declare_length}): {e}")
            });
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "round {round}");
            assert!(
                String::from_utf8_lossy(&body).contains("exceeds"),
                "a 413 says why: {body:?}"
            );
            for (path, payload) in [("/validate", small_review()), ("/", big.clone())] {
                let (status, body) = h2_request(&server, "POST", path, payload, declare_length)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: POST {path} over HTTP/2: {e}"));
                assert_eq!(status, StatusCode::NOT_FOUND, "round {round}: {path}");
                assert!(String::from_utf8_lossy(&body).contains(webhook::PATH));
            }
        }
        let (status, body) = h2_request(&server, "GET", webhook::PATH, Vec::new(), false)
            .await
            .unwrap_or_else(|e| panic!("round {round}: GET over HTTP/2: {e}"));
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!body.is_empty());
        let (status, body) = h2_request(&server, "PUT", webhook::PATH, big.clone(), true)
            .await
            .unwrap_or_else(|e| panic!("round {round}: PUT over HTTP/2: {e}"));
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!body.is_empty());
        let (status, body) =
            h2_request(&server, "POST", webhook::PATH, b"{not json".to_vec(), true)
                .await
                .unwrap_or_else(|e| panic!("round {round}: malformed over HTTP/2: {e}"));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(!body.is_empty());
    }
    assert!(server.store.is_empty());
    // The server still answers reviews over HTTP/2 afterwards.
    let (status, _) = h2_request(&server, "POST", webhook::PATH, small_review(), true)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.store.len(), 1);
}

/// The same over another HTTP/2 implementation: the curl CLI (libcurl with nghttp2). The CLI
/// blocks its thread while the server runs on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_refusals_reach_curl() {
    let server = Server::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, &server.pki.ca_pem).unwrap();
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 9 * 1024 * 1024]).unwrap();
    let small = dir.path().join("review.json");
    std::fs::write(&small, small_review()).unwrap();
    let curl = |method: &str, path: &str, data: &std::path::Path| {
        let out = std::process::Command::new("curl")
            .args(["--http2", "--silent", "--show-error", "--max-time", "30"])
            .arg("--cacert")
            .arg(&ca)
            .args(["-X", method, "-H", "Content-Type: application/json"])
            .arg("--data-binary")
            .arg(format!("@{}", data.display()))
            .args(["--write-out", "\n%{http_version} %{http_code}"])
            .arg(format!("https://{}{path}", server.addr()))
            .output()
            .expect("curl is installed (scripts/install-test-deps.sh)");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl -X {method} {path}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, status) = stdout.rsplit_once('\n').unwrap();
        (status.to_owned(), body.to_owned())
    };
    for _ in 0..8 {
        let (status, body) = curl("POST", webhook::PATH, &big);
        assert_eq!(status, "2 413", "{body}");
        assert!(body.contains("exceeds"), "{body}");
        for data in [&small, &big] {
            let (status, body) = curl("POST", "/validate", data);
            assert_eq!(status, "2 404", "{body}");
        }
        let (status, _) = curl("PUT", webhook::PATH, &small);
        assert_eq!(status, "2 405");
        let (status, body) = curl("POST", webhook::PATH, &small);
        assert_eq!(status, "2 200", "{body}");
    }
    assert_eq!(server.store.len(), 8);
}

/// One review over HTTP/2 (as the API server sends it) on a connection presenting `identity`:
/// the status, or the error that refused the connection.
async fn review_as(
    server: &Server,
    identity: Option<&webhook_support::ClientIdentity>,
) -> Result<StatusCode, String> {
    let tls =
        webhook_support::tls_connect_as(server.addr(), &server.pki.ca_pem, &[b"h2"], identity)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://127.0.0.1{}", webhook::PATH))
        .body(Full::new(Bytes::from(small_review())))
        .unwrap();
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("an answer or an error in time")
        .map_err(|e| format!("request: {e:?}"))?;
    Ok(resp.status())
}

/// With `--webhook-client-ca` only callers holding a certificate from that CA reach the handler:
/// a forged review without one (or with one from another CA, or naming someone else) is refused
/// during the TLS handshake and leaves nothing in the fact store. The CA file reloads.
#[tokio::test]
async fn a_client_ca_refuses_callers_without_its_certificate_at_tls() {
    use webhook_support::ClientCa;
    let apiserver_ca = ClientCa::new("apiserver client CA");
    let other_ca = ClientCa::new("someone else's CA");
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("client-ca.crt");
    std::fs::write(&ca_file, &apiserver_ca.ca_pem).unwrap();
    let server = Server::start(|c| {
        c.client_ca_file = Some(ca_file.clone());
        c.client_names = vec!["kube-apiserver-webhook-client".to_owned()];
    })
    .await;

    let apiserver = apiserver_ca.issue("kube-apiserver-webhook-client", &[]);
    let apiserver_by_san = apiserver_ca.issue("front-proxy", &["kube-apiserver-webhook-client"]);
    let wrong_name = apiserver_ca.issue("mallory", &["mallory.example"]);
    let foreign = other_ca.issue("kube-apiserver-webhook-client", &[]);
    for _ in 0..3 {
        for (who, identity) in [
            ("no certificate", None),
            ("another CA", Some(&foreign)),
            ("a name not allowed", Some(&wrong_name)),
        ] {
            let refused = review_as(&server, identity).await;
            assert!(refused.is_err(), "{who}: {refused:?}");
        }
    }
    assert!(server.store.is_empty(), "a refused caller left a fact");
    assert_eq!(server.store.metrics().facts.get(), 0);
    // Refused during the handshake: counted there, never as a request.
    assert_eq!(
        server
            .store
            .metrics()
            .requests
            .with_label_values(&["recorded"])
            .get(),
        0
    );
    assert!(server.store.metrics().tls_failures.get() >= 9);
    // HTTP/1.1 is refused the same way.
    let tls =
        webhook_support::tls_connect_as(server.addr(), &server.pki.ca_pem, &[b"http/1.1"], None)
            .await;
    if let Ok(tls) = tls {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post(webhook::PATH)
            .header(http::header::HOST, "127.0.0.1")
            .body(Full::new(Bytes::from(small_review())))
            .unwrap();
        assert!(sender.send_request(req).await.is_err());
    }
    assert!(server.store.is_empty());

    assert_eq!(
        review_as(&server, Some(&apiserver)).await,
        Ok(StatusCode::OK)
    );
    assert_eq!(
        review_as(&server, Some(&apiserver_by_san)).await,
        Ok(StatusCode::OK)
    );
    assert_eq!(server.store.len(), 2);
    assert_eq!(server.store.metrics().requests_with("recorded"), 2);

    // A rotated client CA: the old CA's certificates stop working, the new one's start.
    let rotated = ClientCa::new("rotated apiserver client CA");
    std::fs::write(&ca_file, &rotated.ca_pem).unwrap();
    assert!(review_as(&server, Some(&apiserver)).await.is_err());
    let renewed = rotated.issue("kube-apiserver-webhook-client", &[]);
    assert_eq!(review_as(&server, Some(&renewed)).await, Ok(StatusCode::OK));
    // A bundle that does not load keeps the last good one.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    assert_eq!(review_as(&server, Some(&renewed)).await, Ok(StatusCode::OK));
    assert!(review_as(&server, Some(&foreign)).await.is_err());
}

/// Without `--webhook-client-ca` (the default) any caller who completes TLS is served: the
/// behaviour the option exists to close.
#[tokio::test]
async fn without_a_client_ca_any_caller_is_served() {
    let server = Server::start(|_| {}).await;
    let stranger = webhook_support::ClientCa::new("any").issue("anyone", &[]);
    assert_eq!(review_as(&server, None).await, Ok(StatusCode::OK));
    assert_eq!(
        review_as(&server, Some(&stranger)).await,
        Ok(StatusCode::OK)
    );
}
