//! The HTTPS server: TLS only, one path, bounded bodies and patience.
//!
//! ```text
//! TCP accept (at most max_connections at once)
//!   └─ TLS handshake (handshake_timeout; certificate from ReloadingCert; plain HTTP fails here;
//!      with --webhook-client-ca a caller without a certificate from that CA fails here too)
//!        └─ HTTP/1.1 or HTTP/2 (ALPN); HTTP/1 headers within header_read_timeout
//!             └─ POST /process-validating-webhook
//!                  body ≤ max_body_bytes within body_read_timeout ──▶ handler::review
//!                     ──▶ FactStore::record(fact) ──▶ 200 AdmissionReview{allowed: true}
//! ```
//!
//! Failures answer with a clear status and store nothing: 404 (other path), 405 (not POST),
//! 413 (body too large; checked on `Content-Length` first, then while reading), 408 (body too
//! slow), 400 (not a v1 AdmissionReview). Each request is counted by outcome and timed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::facts::FactStore;
use super::handler;
use super::handler::PATH;
use reverser_common::tls::{ReloadingCert, ReloadingClientCa};

/// Default `--webhook-max-body-bytes`: an AdmissionReview carries the object and the old
/// object, each up to etcd's 1.5 MiB, and JSON can be a third larger than what etcd stores.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Errors starting the webhook. Request-level problems never surface here: they are answered
/// with a 4xx and counted.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing PEM in {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Certificate(#[from] reverser_common::tls::TlsError),
    #[error("binding the webhook to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// How the server runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `--webhook-addr`.
    pub addr: SocketAddr,
    /// PEM certificate chain (`--webhook-cert`), re-read when it changes.
    pub cert_file: PathBuf,
    /// PEM private key (`--webhook-key`), re-read when it changes.
    pub key_file: PathBuf,
    /// `--webhook-client-ca`: when set, callers must present a certificate signed by this CA
    /// bundle (re-read when it changes); others are refused during the TLS handshake.
    pub client_ca_file: Option<PathBuf>,
    /// `--webhook-client-names`: with a client CA, the certificate must carry one of these as
    /// subject CN or DNS/URI SAN (any name when empty).
    pub client_names: Vec<String>,
    /// Larger bodies get 413 (`--webhook-max-body-bytes`).
    pub max_body_bytes: usize,
    /// A TLS handshake not done within this closes the connection.
    pub handshake_timeout: Duration,
    /// HTTP/1 request headers not received within this close the connection.
    pub header_read_timeout: Duration,
    /// A body not received within this gets 408.
    pub body_read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// `--sensitive-resources` (`plural` or `plural.group`; core `secrets` always count): reviews of these
    /// types leave no fact and nothing of their content is hashed.
    pub sensitive_resources: Vec<String>,
}

impl WebhookConfig {
    pub fn new(addr: SocketAddr, cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            addr,
            cert_file,
            key_file,
            client_ca_file: None,
            client_names: Vec::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            // The API server gives a webhook at most 30 s in total (default 10 s); a client
            // slower than this is not the API server.
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 512,
            sensitive_resources: Vec::new(),
        }
    }
}

/// Reviews larger than this are handled on the blocking pool.
const BLOCKING_ABOVE_BYTES: usize = 64 * 1024;

/// A running webhook server; dropping it stops the server and every connection.
#[derive(Debug)]
pub struct WebhookHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl WebhookHandle {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every connection. In-flight reviews are cut off; with the
    /// registration's `failurePolicy: Ignore` the API server lets those requests through.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        self.sweeper.abort();
    }
}

impl Drop for WebhookHandle {
    fn drop(&mut self) {
        self.server.abort();
        self.sweeper.abort();
    }
}

/// Loads the certificate, binds `config.addr` and serves until shut down. Facts go to `store`,
/// request metrics to `store.metrics()`.
pub async fn spawn(config: WebhookConfig, store: FactStore) -> Result<WebhookHandle, WebhookError> {
    // One provider for the whole workspace (ring); naming it here keeps the server independent
    // of whether main() installed the process default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::follow(
        "webhook",
        config.cert_file.clone(),
        config.key_file.clone(),
        Arc::clone(&provider),
    )?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(WebhookError::Tls)?;
    let mut tls = match &config.client_ca_file {
        None => builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver)),
        Some(ca) => {
            let verifier = ReloadingClientCa::follow(
                "webhook",
                ca.clone(),
                config.client_names.clone(),
                provider,
            )?;
            let mut tls = builder
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(Arc::new(resolver));
            // A resumed session skips the client-certificate check, so a certificate the
            // reloaded CA no longer signs would keep working: full handshakes only.
            tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            tls.send_tls13_tickets = 0;
            tls
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: config.addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| WebhookError::Bind {
        addr: config.addr,
        source,
    })?;
    info!(addr = %local_addr, path = PATH, client_ca = ?config.client_ca_file, "attribution webhook listening (TLS)");

    let sweep_every =
        (store.config().ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let sweeper = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            loop {
                tick.tick().await;
                store.sweep();
            }
        })
    };
    let (stop, stop_rx) = oneshot::channel();
    let server = tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(Arc::new(tls)),
        Arc::new(Ctx {
            store,
            config: config.clone(),
        }),
        stop_rx,
    ));
    Ok(WebhookHandle {
        local_addr,
        stop: Some(stop),
        server,
        sweeper,
    })
}

struct Ctx {
    store: FactStore,
    config: WebhookConfig,
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    mut stop: oneshot::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(ctx.config.max_connections.max(1)));
    // Dropping the set (when this task ends or is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        // Waiting for a permit before accepting leaves excess clients in the kernel backlog
        // instead of holding their buffers here.
        let permit = tokio::select! {
            _ = &mut stop => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let ctx = Arc::clone(&ctx);
        connections.spawn(async move {
            serve_connection(tcp, peer, acceptor, ctx).await;
            drop(permit);
        });
    }
    info!("attribution webhook stopped");
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, ctx: Arc<Ctx>) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(ctx.config.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // Plain HTTP lands here (there is no plaintext listener to fall back to), and so
            // does a caller refused by --webhook-client-ca.
            ctx.store.metrics().tls_failures.inc();
            debug!(%peer, %error, "webhook TLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.store.metrics().tls_failures.inc();
            debug!(%peer, "webhook TLS handshake timed out");
            return;
        }
    };
    let header_read_timeout = ctx.config.header_read_timeout;
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
        debug!(%peer, %error, "webhook connection ended");
    }
}

/// A reply before it is counted and timed.
struct Reply {
    status: StatusCode,
    outcome: &'static str,
    body: Bytes,
    json: bool,
}

impl Reply {
    fn error(status: StatusCode, outcome: &'static str, message: impl Into<String>) -> Self {
        let mut text = message.into();
        text.push('\n');
        Self {
            status,
            outcome,
            body: Bytes::from(text),
            json: false,
        }
    }
}

impl Ctx {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let is_http1 = req.version() < http::Version::HTTP_2;
        let reply = self.process(req).await;
        let metrics = self.store.metrics();
        metrics.requests.with_label_values(&[reply.outcome]).inc();
        metrics.latency.observe(started.elapsed().as_secs_f64());
        let content_type = if reply.json {
            "application/json"
        } else {
            "text/plain; charset=utf-8"
        };
        let mut response = Response::builder()
            .status(reply.status)
            .header(header::CONTENT_TYPE, content_type);
        if reply.status == StatusCode::METHOD_NOT_ALLOWED {
            response = response.header(header::ALLOW, "POST");
        }
        if is_http1
            && (reply.status == StatusCode::PAYLOAD_TOO_LARGE
                || reply.status == StatusCode::REQUEST_TIMEOUT)
        {
            // The rest of the body is drained or cut off, never parsed: do not reuse the
            // connection. (HTTP/2 has no Connection header; the stream ends on its own.)
            response = response.header(header::CONNECTION, "close");
        }
        response
            .body(Full::new(reply.body))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }

    async fn process(&self, req: Request<Incoming>) -> Reply {
        let (parts, mut body) = req.into_parts();
        // Every refusal before the end of the body leaves the rest to a bounded drain: over
        // HTTP/2 a client still sending reads the answer only once it may finish its upload,
        // and dropping the body instead resets the stream before the answer is seen.
        let refuse = |reply: Reply, body: Incoming| {
            self.drain(body);
            reply
        };
        if parts.uri.path() != PATH {
            return refuse(
                Reply::error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("not found; the webhook path is {PATH}"),
                ),
                body,
            );
        }
        if parts.method != Method::POST {
            return refuse(
                Reply::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "only POST is allowed",
                ),
                body,
            );
        }
        let max = self.config.max_body_bytes;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return refuse(too_large(max), body);
        }
        let bytes =
            match tokio::time::timeout(self.config.body_read_timeout, read_body(&mut body, max))
                .await
            {
                Err(_) => {
                    return Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        "request body not received in time",
                    );
                }
                Ok(Err(BodyError::TooLarge)) => return refuse(too_large(max), body),
                Ok(Err(BodyError::Read(error))) => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        "malformed",
                        format!("reading the request body: {error}"),
                    );
                }
                Ok(Ok(bytes)) => bytes,
            };
        // Rendering a large object takes milliseconds: do it off the async workers, so one big
        // review does not hold up the handshakes and small reviews of other connections.
        let reviewed = if bytes.len() > BLOCKING_ABOVE_BYTES {
            let sensitive = self.config.sensitive_resources.clone();
            match tokio::task::spawn_blocking(move || handler::review(&bytes, &sensitive)).await {
                Ok(reviewed) => reviewed,
                Err(error) => {
                    warn!(%error, "admission review task failed");
                    return Reply::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal_error",
                        "internal error",
                    );
                }
            }
        } else {
            handler::review(&bytes, &self.config.sensitive_resources)
        };
        match reviewed {
            Err(error) => {
                debug!(%error, "rejecting a malformed admission review");
                Reply::error(StatusCode::BAD_REQUEST, "malformed", error.to_string())
            }
            Ok(reviewed) => {
                if let Some(fact) = reviewed.fact {
                    debug!(object = %fact.key, user = %fact.username, operation = ?fact.operation, "attribution fact");
                    self.store.record(fact);
                } else if let handler::Outcome::Ignored(reason) = reviewed.outcome {
                    debug!(reason, "admission review produced no fact");
                }
                Reply {
                    status: StatusCode::OK,
                    outcome: reviewed.outcome.label(),
                    body: Bytes::from(reviewed.response),
                    json: true,
                }
            }
        }
    }
}

impl Ctx {
    /// Reads and discards what is left of a refused request's body in the background, at most
    /// [`drain_budget`] bytes within the body timeout; a client sending more or slower has its
    /// stream (HTTP/2) or connection (HTTP/1) cut, after the answer went out.
    fn drain(&self, mut body: Incoming) {
        if body.is_end_stream() {
            return;
        }
        let budget = drain_budget(self.config.max_body_bytes);
        let patience = self.config.body_read_timeout;
        tokio::spawn(async move {
            let discard = async {
                let mut seen = 0usize;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return };
                    if let Some(data) = frame.data_ref() {
                        seen = seen.saturating_add(data.len());
                        if seen > budget {
                            debug!(
                                budget,
                                "refused request body exceeds the drain budget; cutting it off"
                            );
                            return;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(patience, discard).await;
        });
    }
}

/// Most bytes of a refused body read and thrown away so the client sees the answer.
fn drain_budget(max_body_bytes: usize) -> usize {
    max_body_bytes.max(1024 * 1024).saturating_mul(4)
}

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// The whole body, or `TooLarge` as soon as it passes `max` (the rest stays unread in `body`).
async fn read_body(body: &mut Incoming, max: usize) -> Result<Bytes, BodyError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(BodyError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

fn too_large(max: usize) -> Reply {
    Reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("request body exceeds {max} bytes (--webhook-max-body-bytes)"),
    )
}
