//! Shared helpers for the integration tests: an in-process emulator and a raw HTTP client
//! (for checking exact status codes, headers and bodies).

#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube_emulator::Emulator;
use serde_json::Value;

pub async fn emulator() -> Emulator {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Emulator::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts")
}

pub struct Raw {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Raw {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The lines of a (finished) watch stream, parsed.
    pub fn events(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("watch line is JSON"))
            .collect()
    }
}

/// One HTTP/1.1 request; the whole body is read (use `timeoutSeconds` for watches).
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Raw {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    let mut has_ct = false;
    for (k, v) in headers {
        has_ct |= k.eq_ignore_ascii_case("content-type");
        req = req.header(*k, *v);
    }
    if !has_ct && !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Raw {
        status,
        headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Raw {
    raw(addr, "GET", path, &[], "").await
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Raw {
    raw(addr, "POST", path, &[], body).await
}

pub async fn put(addr: SocketAddr, path: &str, body: &str) -> Raw {
    raw(addr, "PUT", path, &[], body).await
}

pub async fn delete(addr: SocketAddr, path: &str) -> Raw {
    raw(addr, "DELETE", path, &[], "").await
}

pub async fn patch(addr: SocketAddr, path: &str, content_type: &str, body: &str) -> Raw {
    raw(addr, "PATCH", path, &[("content-type", content_type)], body).await
}

/// Reads a corpus fixture (`tests/fixtures/apiserver-corpus/...`) as JSON.
pub fn corpus(rel: &str) -> Value {
    let path = testkit::manifest_dir()
        .join("../fixtures/apiserver-corpus")
        .join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).expect("corpus YAML")
}

pub fn cm(name: &str, labels: Value) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"key": "value"}
    })
    .to_string()
}

/// An open watch stream, read line by line as events arrive.
pub struct WatchLines {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    pub status: u16,
}

impl WatchLines {
    /// The next event, or None when the server ended the stream. Guarded by a generous
    /// timeout so a broken emulator fails the test instead of hanging it.
    pub async fn next(&mut self) -> Option<Value> {
        use hyper::body::Body as _;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("watch line is JSON"));
            }
            let frame = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx)),
            )
            .await
            .expect("watch event within 30s");
            match frame {
                None => return None,
                Some(f) => {
                    if let Ok(data) = f.expect("body frame").into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next event that is not a BOOKMARK.
    pub async fn next_change(&mut self) -> Option<Value> {
        loop {
            let ev = self.next().await?;
            if ev["type"] != "BOOKMARK" {
                return Some(ev);
            }
        }
    }
}

pub async fn watch(addr: SocketAddr, path: &str) -> WatchLines {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("request");
    WatchLines {
        status: resp.status().as_u16(),
        body: resp.into_body(),
        buf: Vec::new(),
    }
}

/// Does `actual` have the shape of the corpus' `expected`? Placeholders such as `<rv-1>` in
/// expected strings match any text; `managedFields` (not emulated) are ignored.
pub fn assert_shape(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let ek: Vec<&String> = e.keys().filter(|k| *k != "managedFields").collect();
            let ak: Vec<&String> = a.keys().filter(|k| *k != "managedFields").collect();
            assert_eq!(
                ek, ak,
                "keys differ at {path}: expected {expected}, got {actual}"
            );
            for k in ek {
                assert_shape(&e[k], &a[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(e.len(), a.len(), "lengths differ at {path}");
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                assert_shape(e, a, &format!("{path}[{i}]"));
            }
        }
        (Value::String(e), Value::String(a)) if e.contains('<') => {
            assert!(
                matches_placeholders(e, a),
                "{path}: {a:?} does not match {e:?}"
            );
        }
        // A placeholder stands for a number, too (e.g. generation).
        (Value::String(e), _) if e.starts_with('<') && e.ends_with('>') => {}
        _ => assert_eq!(expected, actual, "at {path}"),
    }
}

fn matches_placeholders(pattern: &str, s: &str) -> bool {
    // Literal pieces between placeholders must appear in order.
    let mut literals = Vec::new();
    let mut rest = pattern;
    while let Some(i) = rest.find('<') {
        literals.push(&rest[..i]);
        match rest[i..].find('>') {
            Some(j) => rest = &rest[i + j + 1..],
            None => return false,
        }
    }
    literals.push(rest);
    let mut pos = 0;
    for (n, lit) in literals.iter().enumerate() {
        if n == 0 {
            if !s.starts_with(lit) {
                return false;
            }
            pos = lit.len();
        } else if n == literals.len() - 1 {
            return s.len() >= pos + lit.len() && s.ends_with(lit);
        } else {
            match s[pos..].find(lit) {
                Some(i) => pos += i + lit.len(),
                None => return false,
            }
        }
    }
    true
}
