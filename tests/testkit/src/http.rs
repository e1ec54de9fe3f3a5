//! Smart HTTP over TLS: the real `git http-backend` (CGI) behind a small hyper + rustls server
//! that enforces HTTP basic auth. The certificate is issued by a throwaway CA ([`ca_pem`] /
//! [`ca_file`]) for `127.0.0.1` and `localhost`.
//!
//! [`ca_pem`]: HttpGitServer::ca_pem
//! [`ca_file`]: HttpGitServer::ca_file

use std::convert::Infallible;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use crate::BareRepo;
use crate::util::require_tool;

type HttpBody = BoxBody<Bytes, std::io::Error>;

/// A running HTTPS smart-git server on 127.0.0.1 requiring `username`/`password`.
pub struct HttpGitServer {
    host: Ipv4Addr,
    port: u16,
    repo_name: String,
    ca_pem: String,
    dir: TempDir,
    stats: Arc<Stats>,
    accepted: Arc<std::sync::RwLock<(String, String)>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Stats {
    requests: AtomicUsize,
    unauthorized: AtomicUsize,
}

struct Config {
    git: PathBuf,
    root: PathBuf,
    /// The accepted `(username, password)`; [`HttpGitServer::set_credentials`] replaces it.
    accepted: Arc<std::sync::RwLock<(String, String)>>,
    stats: Arc<Stats>,
}

impl HttpGitServer {
    /// Serves the root of `repo`; [`url`](Self::url) points at it.
    pub fn start(repo: &BareRepo, username: &str, password: &str) -> Self {
        Self::start_root(repo.root(), repo.name(), username, password)
    }

    /// Serves every repo under `root`; [`url`](Self::url) points at `root/repo_name`.
    pub fn start_root(root: &Path, repo_name: &str, username: &str, password: &str) -> Self {
        Self::start_root_at(root, repo_name, username, password, Ipv4Addr::LOCALHOST)
    }

    /// [`start_root`](Self::start_root) listening on `host` (its certificate names `host` too), for clients that
    /// reach it over a network namespace's link.
    pub fn start_root_at(
        root: &Path,
        repo_name: &str,
        username: &str,
        password: &str,
        host: Ipv4Addr,
    ) -> Self {
        let git = require_tool("git", "apt-get install -y git");
        let (ca_pem, server_config) = tls_config(host);
        let dir = tempfile::tempdir().expect("cannot create a temp dir");
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        let listener =
            TcpListener::bind((host, 0)).unwrap_or_else(|e| panic!("bind {host}:0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("local addr").port();
        let stats = Arc::new(Stats::default());
        let accepted = Arc::new(std::sync::RwLock::new((
            username.to_owned(),
            password.to_owned(),
        )));
        let config = Arc::new(Config {
            git,
            root: root.to_owned(),
            accepted: Arc::clone(&accepted),
            stats: Arc::clone(&stats),
        });
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("https-git-{port}"))
            .spawn(move || serve(listener, server_config, config, stop))
            .expect("spawn server thread");
        Self {
            host,
            port,
            repo_name: repo_name.to_owned(),
            ca_pem,
            dir,
            stats,
            accepted,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:P/repo.git` (or its `host`).
    pub fn url(&self) -> String {
        self.url_for(&self.repo_name)
    }

    /// The URL of another repo under the served root.
    pub fn url_for(&self, repo_name: &str) -> String {
        format!("https://{}:{}/{repo_name}", self.host, self.port)
    }

    /// The issuing CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A file holding [`ca_pem`](Self::ca_pem).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// HTTP requests served so far (including refused ones).
    pub fn request_count(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// From now on only `username`/`password` are accepted (a rotated token; the old one gets 401).
    pub fn set_credentials(&self, username: &str, password: &str) {
        *self.accepted.write().expect("credentials lock") =
            (username.to_owned(), password.to_owned());
    }

    /// Requests answered 401 so far.
    pub fn unauthorized_count(&self) -> usize {
        self.stats.unauthorized.load(Ordering::SeqCst)
    }
}

impl Drop for HttpGitServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1/localhost (and `host`) signed by it.
fn tls_config(host: Ipv4Addr) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "testkit CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("self-signed CA");
    let leaf_key = KeyPair::generate().expect("server key");
    let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    if host != Ipv4Addr::LOCALHOST {
        names.push(host.to_string());
    }
    let mut leaf_params = CertificateParams::new(names).expect("params");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .expect("server certificate");
    let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server TLS config");
    (ca.pem(), Arc::new(config))
}

fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    config: Arc<Config>,
    mut stop: oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let tcp = tokio::select! {
                _ = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let acceptor = acceptor.clone();
            let config = Arc::clone(&config);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // a client that does not trust us hangs up here
                };
                let service = hyper::service::service_fn(move |req| {
                    let config = Arc::clone(&config);
                    async move { Ok::<_, Infallible>(handle(req, &config).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

async fn handle(req: Request<Incoming>, config: &Config) -> Response<HttpBody> {
    config.stats.requests.fetch_add(1, Ordering::SeqCst);
    if !authorized(&req, config) {
        config.stats.unauthorized.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"testkit\"")
            .body(full("authentication required\n"))
            .expect("401 response");
    }
    match run_cgi(req, config).await {
        Ok(response) => response,
        Err(e) => Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(full(&format!("git http-backend failed: {e}\n")))
            .expect("500 response"),
    }
}

fn authorized(req: &Request<Incoming>, config: &Config) -> bool {
    let expected = {
        let (username, password) = &*config.accepted.read().expect("credentials lock");
        format!("{username}:{password}")
    };
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .is_some_and(|decoded| decoded == expected.as_bytes())
}

/// Runs `git http-backend` for one request, streaming the request body to its stdin and its
/// stdout (after the CGI headers) back as the response body.
async fn run_cgi(req: Request<Incoming>, config: &Config) -> std::io::Result<Response<HttpBody>> {
    let (parts, mut body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let username = config.accepted.read().expect("credentials lock").0.clone();
    let mut cmd = tokio::process::Command::new(&config.git);
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", &config.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", username)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""));
    for (var, name) in [
        ("CONTENT_TYPE", "content-type"),
        ("CONTENT_LENGTH", "content-length"),
        ("HTTP_CONTENT_ENCODING", "content-encoding"),
        ("GIT_PROTOCOL", "git-protocol"),
    ] {
        if let Some(value) = header(name) {
            cmd.env(var, value);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    tokio::spawn(async move {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && stdin.write_all(&data).await.is_err()
            {
                return;
            }
        }
        // Dropping stdin closes it: end of the request body.
    });
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut response = Response::builder();
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).await? == 0 {
            break;
        }
        let header_line = line.trim_end_matches(['\r', '\n']);
        if header_line.is_empty() {
            break;
        }
        let Some((name, value)) = header_line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("Status") {
            let code = value.split_whitespace().next().unwrap_or("200");
            response = response.status(code.parse::<u16>().unwrap_or(500));
        } else {
            response = response.header(name, value);
        }
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
        let _ = child.wait().await;
    });
    response
        .body(ChannelBody { rx }.boxed())
        .map_err(std::io::Error::other)
}

fn full(text: &str) -> HttpBody {
    Full::new(Bytes::from(text.to_owned()))
        .map_err(|never| match never {})
        .boxed()
}

/// A response body fed by a channel, so the CGI output streams instead of being buffered.
struct ChannelBody {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}
