//! Latency the webhook adds to an API request, at a steady 200 requests/s (open loop: a
//! request is sent every 5 ms whether or not the previous one finished). It prints figures and
//! asserts nothing about them:
//!
//! ```sh
//! cargo test -p reverser-agent --test webhook_latency -- --ignored --nocapture
//! WEBHOOK_BENCH_SECS=10 cargo test --release -p reverser-agent --test webhook_latency -- --ignored --nocapture
//! ```
//!
//! Each run reports the round trip the API server waits for (p50/p90/p99/max) in two client
//! modes — one reused HTTP/2 connection (what kube-apiserver does) and a fresh TLS connection
//! per request (the worst case, what the kube-emulator does) — for a small review (the corpus
//! ConfigMap update, 1.7 KiB) and a large one (64 KiB of data, twice). A bare TLS server that
//! answers the same bytes without parsing anything gives the baseline; the difference is the
//! webhook's own work (parse, sanitize, render, hash, record).

mod webhook_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reverser_agent::webhook;
use serde_json::{Value, json};
use webhook_support::{Pki, Server, corpus, review_of, tls_connect};

const RATE: u32 = 200;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Http2Reused,
    FreshTlsPerRequest,
}

fn review(name: &str, data_bytes: usize) -> Vec<u8> {
    let mut request: Value = corpus("configmap/update/admission.update.yaml")["request"].clone();
    request["uid"] = json!(format!("req-{name}"));
    request["name"] = json!(name);
    for field in ["object", "oldObject"] {
        request[field]["metadata"]["name"] = json!(name);
        if data_bytes > 0 {
            request[field]["data"]["blob"] = json!("x".repeat(data_bytes));
        }
    }
    review_of(request)
}

/// A TLS server with the webhook's certificate that answers every POST with a fixed
/// AdmissionReview after reading the body, and does nothing else.
async fn bare_server(pki: &Pki) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![rustls::pki_types::CertificateDer::from(
        pki.leaf_der.clone(),
    )];
    let key_pem = std::fs::read(pki.key_file()).unwrap();
    let key =
        <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            &key_pem,
        )
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                            webhook::handler::allowed("x"),
                        ))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

async fn run(
    addr: SocketAddr,
    ca: &str,
    mode: Mode,
    data_bytes: usize,
    secs: u64,
) -> Vec<Duration> {
    let h2 = match mode {
        Mode::Http2Reused => {
            let tls = tls_connect(addr, ca, &[b"h2"]).await;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Some(sender)
        }
        Mode::FreshTlsPerRequest => None,
    };
    let total = RATE as u64 * secs;
    let bodies: Vec<Bytes> = (0..total)
        .map(|i| Bytes::from(review(&format!("cm-{i}"), data_bytes)))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(bodies.len());
    for body in bodies {
        tick.tick().await;
        let ca = ca.to_owned();
        let h2 = h2.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let status = match h2 {
                Some(mut sender) => {
                    let req = http::Request::post(format!("https://127.0.0.1{}", webhook::PATH))
                        .body(Full::new(body))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    let status = resp.status();
                    resp.into_body().collect().await.unwrap();
                    status
                }
                None => {
                    let tls = tls_connect(addr, &ca, &[b"http/1.1"]).await;
                    let (mut sender, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(tls))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    let req = http::Request::post(webhook::PATH)
                        .header(http::header::HOST, "127.0.0.1")
                        .body(Full::new(body))
                        .unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    let status = resp.status();
                    resp.into_body().collect().await.unwrap();
                    status
                }
            };
            assert!(status.is_success(), "{status}");
            started.elapsed()
        }));
    }
    let mut rtts = Vec::with_capacity(tasks.len());
    for task in tasks {
        rtts.push(task.await.unwrap());
    }
    rtts.sort();
    rtts
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints latency figures; run with --ignored --nocapture"]
async fn webhook_added_latency_at_200_requests_per_second() {
    let secs: u64 = std::env::var("WEBHOOK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let server = Server::start(|_| {}).await;
    let bare = bare_server(&server.pki).await;
    let ca = server.pki.ca_pem.clone();
    println!(
        "\n{RATE} requests/s for {secs} s per row ({} requests); round trip in ms",
        RATE as u64 * secs
    );
    println!(
        "{:<10} {:<22} {:<8} {:>7} {:>7} {:>7} {:>7}",
        "payload", "client", "server", "p50", "p90", "p99", "max"
    );
    for (payload, data_bytes) in [("1.7 KiB", 0usize), ("130 KiB", 64 * 1024)] {
        for mode in [Mode::Http2Reused, Mode::FreshTlsPerRequest] {
            for (name, addr) in [("bare", bare), ("webhook", server.addr())] {
                let rtts = run(addr, &ca, mode, data_bytes, secs).await;
                println!(
                    "{:<10} {:<22} {:<8} {:>7.3} {:>7.3} {:>7.3} {:>7.3}",
                    payload,
                    format!("{mode:?}"),
                    name,
                    pct(&rtts, 0.50),
                    pct(&rtts, 0.90),
                    pct(&rtts, 0.99),
                    rtts.last().unwrap().as_secs_f64() * 1000.0,
                );
            }
        }
    }
    let latency = &server.store.metrics().latency;
    println!(
        "webhook server-side time per request (histogram mean): {:.3} ms over {} requests; facts held {}",
        latency.get_sample_sum() / latency.get_sample_count() as f64 * 1000.0,
        latency.get_sample_count(),
        server.store.len()
    );
}

#[test]
#[ignore = "benchmark: prints the handler's own cost; run with --ignored --nocapture"]
fn handler_cost_per_review() {
    for (payload, data_bytes) in [("1.7 KiB", 0usize), ("130 KiB", 64 * 1024)] {
        let body = review("cm-x", data_bytes);
        let rounds = 200;
        let started = Instant::now();
        for _ in 0..rounds {
            let reviewed = webhook::handler::review(&body, &[]).unwrap();
            assert!(reviewed.fact.is_some());
        }
        println!(
            "handler::review, {payload} review ({} bytes): {:.3} ms per call",
            body.len(),
            started.elapsed().as_secs_f64() * 1000.0 / rounds as f64
        );
    }
}
