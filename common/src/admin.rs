//! The admin HTTP endpoint both binaries serve: `/metrics` (Prometheus text from one explicit registry),
//! `/healthz` (the process runs) and `/readyz` (the process is ready to do its job).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::{net::TcpListener, sync::watch};

/// Shared readiness flag: `true` once the process can serve its purpose.
#[derive(Clone)]
pub struct Readiness(Arc<watch::Sender<bool>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.send_replace(ready);
    }
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        continue;
                    }
                },
            };
            let registry = registry.clone();
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = handle(&req, &registry, &readiness);
                    async move { Ok::<_, Infallible>(response) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(error) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "admin connection ended");
                }
            });
        }
    });
    Ok((local, handle))
}

fn handle(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let encoder = TextEncoder::new();
            let mut buffer = Vec::new();
            if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("encoding metrics: {error}\n"),
                );
            }
            Response::builder()
                .header(header::CONTENT_TYPE, encoder.format_type())
                .body(Full::new(Bytes::from(buffer)))
                .expect("static response")
        }
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.get() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("static response")
}
