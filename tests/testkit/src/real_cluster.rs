//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager v1.37.2, built from
//! their Go modules by `scripts/build-real-kube.sh` (part of the test command), running on loopback ports.
//!
//! ```text
//! RealCluster::start()
//!   PKI (rcgen: CA, serving cert for 127.0.0.1, admin client cert, service-account key, static tokens)
//!   → etcd (fresh data dir)  → kube-apiserver (RBAC, client certs + tokens, short compaction interval)
//!   → /readyz → kube-controller-manager (GC, namespaces, deployments, ReplicaSets, EndpointSlices, SAs, …)
//!   → default ServiceAccount exists → ready
//! Drop: SIGTERM controller-manager, apiserver, etcd (SIGKILL after a grace); a watchdog kills them if the test
//! process dies without dropping.
//! ```
//!
//! Identities: the admin kubeconfig ([`RealCluster::kubeconfig`]) authenticates with a client certificate in
//! `system:masters`; [`RealCluster::kubeconfig_yaml`] makes one for any static token user declared with
//! [`RealClusterBuilder::user`] (`alice` and `bob` exist by default, with no permissions), and
//! [`RealCluster::service_account_kubeconfig`] one for a ServiceAccount (a TokenRequest token). Missing binaries
//! are a loud failure with the command that builds them, never a skip.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{OrphanWatchdog, free_port};

/// Version the binaries are built at (`scripts/build-real-kube.sh`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// Where the built binaries are: `$REVERSER_REAL_KUBE_BIN`, else `.tools/real-kube/bin` of this repository.
pub fn real_kube_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REVERSER_REAL_KUBE_BIN") {
        return PathBuf::from(dir);
    }
    crate::workspace_root().join(".tools/real-kube/bin")
}

/// The path of one real-Kubernetes binary (`kube-apiserver`, `kube-controller-manager`, `kubectl`, `etcd`,
/// `helm`); panics with the build command when it is missing.
pub fn real_kube_binary(name: &str) -> PathBuf {
    let path = real_kube_bin_dir().join(name);
    assert!(
        path.is_file(),
        "the real Kubernetes binary {} is missing: build it with ./scripts/build-real-kube.sh \
         (the test command ./scripts/test.sh does this), or point REVERSER_REAL_KUBE_BIN at a directory holding it",
        path.display()
    );
    path
}

/// A static-token user of the real API server.
#[derive(Clone, Debug)]
pub struct TokenUser {
    pub token: String,
    pub name: String,
    pub groups: Vec<String>,
}

/// Options of a [`RealCluster`].
#[derive(Clone, Debug)]
pub struct RealClusterBuilder {
    users: Vec<TokenUser>,
    compaction_interval: Duration,
    controller_manager: bool,
    apiserver_args: Vec<String>,
    etcd_args: Vec<String>,
    serving_names: Vec<String>,
}

impl Default for RealClusterBuilder {
    fn default() -> Self {
        RealClusterBuilder {
            users: ["alice", "bob"]
                .iter()
                .map(|name| TokenUser {
                    token: format!("{name}-token"),
                    name: (*name).to_owned(),
                    groups: vec!["testers".to_owned()],
                })
                .collect(),
            // Short, so that a test can provoke 410 Gone by waiting two intervals.
            compaction_interval: Duration::from_secs(10),
            controller_manager: true,
            apiserver_args: Vec::new(),
            etcd_args: Vec::new(),
            serving_names: Vec::new(),
        }
    }
}

impl RealClusterBuilder {
    /// Adds a static-token user (name, groups); its token is `{name}-token`.
    pub fn user(mut self, name: &str, groups: &[&str]) -> Self {
        self.users.push(TokenUser {
            token: format!("{name}-token"),
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        });
        self
    }

    /// How often the API server compacts etcd (`--etcd-compaction-interval`; default 10 s).
    /// A revision is gone about two intervals after the next write; with `--watch-cache=false`
    /// ([`RealClusterBuilder::apiserver_arg`]) a watch from it then ends in 410 Gone (the cache would serve it).
    pub fn compaction_interval(mut self, every: Duration) -> Self {
        self.compaction_interval = every;
        self
    }

    /// Runs without kube-controller-manager (no GC, no namespace finalization).
    pub fn without_controller_manager(mut self) -> Self {
        self.controller_manager = false;
        self
    }

    /// More kube-apiserver flags (`--name=value`).
    pub fn apiserver_arg(mut self, arg: &str) -> Self {
        self.apiserver_args.push(arg.to_owned());
        self
    }

    /// More etcd flags (`--name=value`), e.g. `--quota-backend-bytes` for a bulk load past etcd's 2 GiB default.
    pub fn etcd_arg(mut self, arg: &str) -> Self {
        self.etcd_args.push(arg.to_owned());
        self
    }

    /// One more name or IP address in the API server's serving certificate, for clients that reach it through
    /// another address (a forwarder on a network namespace's link).
    pub fn serving_name(mut self, name: &str) -> Self {
        self.serving_names.push(name.to_owned());
        self
    }

    /// Starts the control plane; blocks until it is ready (at most ~90 s on a loaded machine).
    pub fn start_blocking(self) -> RealCluster {
        RealCluster::start_with(self)
    }

    /// [`RealClusterBuilder::start_blocking`] on tokio's blocking pool.
    pub async fn start(self) -> RealCluster {
        tokio::task::spawn_blocking(move || self.start_blocking())
            .await
            .expect("the real cluster start-up task")
    }
}

struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager), stopped on drop.
pub struct RealCluster {
    dir: tempfile::TempDir,
    /// In start order; stopped in reverse.
    components: Vec<Component>,
    watchdog: Option<OrphanWatchdog>,
    api_port: u16,
    etcd_port: u16,
    users: Vec<TokenUser>,
    ca_pem: String,
    kubeconfig: PathBuf,
}

impl std::fmt::Debug for RealCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealCluster")
            .field("url", &self.url())
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl RealCluster {
    /// Options; `RealCluster::builder().start().await`.
    pub fn builder() -> RealClusterBuilder {
        RealClusterBuilder::default()
    }

    /// A control plane with the default options.
    pub async fn start() -> RealCluster {
        Self::builder().start().await
    }

    /// Starts the components; a start-up in which a component exits (most often a loopback port that another
    /// test took between picking it and binding it) is retried with fresh ports, twice at most.
    fn start_with(options: RealClusterBuilder) -> RealCluster {
        let mut attempt = 1;
        loop {
            let this_try = options.clone();
            match std::panic::catch_unwind(move || Self::start_once(this_try)) {
                Ok(cluster) => return cluster,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    if attempt >= 3 || !message.contains(" exited (") {
                        std::panic::resume_unwind(panic);
                    }
                    eprintln!(
                        "real cluster start-up attempt {attempt} failed, retrying: {message}"
                    );
                    attempt += 1;
                }
            }
        }
    }

    fn start_once(options: RealClusterBuilder) -> RealCluster {
        let started = Instant::now();
        let etcd_bin = real_kube_binary("etcd");
        let apiserver_bin = real_kube_binary("kube-apiserver");
        let kcm_bin = real_kube_binary("kube-controller-manager");
        real_kube_binary("kubectl");

        let dir = tempfile::Builder::new()
            .prefix("real-kube-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki::write(dir.path(), &options.users, &options.serving_names);
        let etcd_port = free_port();
        let peer_port = free_port();
        let api_port = free_port();
        let kcm_port = free_port();
        let root = dir.path().to_owned();

        let mut cluster = RealCluster {
            kubeconfig: root.join("admin.kubeconfig"),
            dir,
            components: Vec::new(),
            watchdog: None,
            api_port,
            etcd_port,
            users: options.users,
            ca_pem: pki.ca_pem.clone(),
        };
        std::fs::write(&cluster.kubeconfig, cluster.admin_kubeconfig_yaml(&pki)).unwrap();

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster.spawn(
            "etcd",
            Command::new(&etcd_bin)
                .args([
                    "--name=test".to_owned(),
                    format!("--data-dir={}", root.join("etcd").display()),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster=test={peer_url}"),
                    "--unsafe-no-fsync=true".to_owned(),
                    "--log-level=warn".to_owned(),
                ])
                .args(&options.etcd_args),
        );
        cluster.start_watchdog();
        cluster.wait_until(
            "etcd to accept connections",
            Duration::from_secs(30),
            |_| std::net::TcpStream::connect(("127.0.0.1", etcd_port)).is_ok(),
        );

        let p = |name: &str| root.join("pki").join(name).display().to_string();
        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p("")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".to_owned(),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--endpoint-reconciler-type=none".to_owned(),
            "--allow-privileged=true".to_owned(),
            format!("--service-account-issuer=https://127.0.0.1:{api_port}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!(
                "--etcd-compaction-interval={}s",
                options.compaction_interval.as_secs().max(1)
            ),
            "--v=0".to_owned(),
        ];
        if !options.controller_manager {
            // Without the ServiceAccount controller no `default` ServiceAccount appears; envtest does the same.
            apiserver_args.push("--disable-admission-plugins=ServiceAccount".to_owned());
        }
        apiserver_args.extend(options.apiserver_args);
        cluster.spawn(
            "kube-apiserver",
            Command::new(&apiserver_bin).args(&apiserver_args),
        );
        cluster.wait_until(
            "kube-apiserver /readyz",
            Duration::from_secs(90),
            |cluster| {
                cluster
                    .kubectl(&["get", "--raw", "/readyz"])
                    .status
                    .success()
            },
        );

        if options.controller_manager {
            cluster.spawn(
                "kube-controller-manager",
                Command::new(&kcm_bin).args([
                    format!("--kubeconfig={}", cluster.kubeconfig.display()),
                    format!("--authentication-kubeconfig={}", cluster.kubeconfig.display()),
                    format!("--authorization-kubeconfig={}", cluster.kubeconfig.display()),
                    "--bind-address=127.0.0.1".to_owned(),
                    format!("--secure-port={kcm_port}"),
                    "--leader-elect=false".to_owned(),
                    format!("--service-account-private-key-file={}", p("sa.key")),
                    format!("--root-ca-file={}", p("ca.crt")),
                    format!("--cluster-signing-cert-file={}", p("ca.crt")),
                    format!("--cluster-signing-key-file={}", p("ca.key")),
                    "--controllers=garbage-collector-controller,namespace-controller,deployment-controller,\
                     replicaset-controller,endpointslice-controller,endpointslice-mirroring-controller,\
                     serviceaccount-controller,serviceaccount-token-controller,\
                     root-ca-certificate-publisher-controller,clusterrole-aggregation-controller,\
                     statefulset-controller,daemonset-controller,job-controller,cronjob-controller,\
                     disruption-controller,ttl-after-finished-controller,resourcequota-controller"
                        .to_owned(),
                    "--v=0".to_owned(),
                ]),
            );
            cluster.wait_until(
                "kube-controller-manager to create the default ServiceAccount",
                Duration::from_secs(60),
                |cluster| {
                    cluster
                        .kubectl(&["-n", "default", "get", "serviceaccount", "default"])
                        .status
                        .success()
                },
            );
        }
        eprintln!(
            "real cluster {KUBERNETES_VERSION} ready at {} in {:.1} s ({})",
            cluster.url(),
            started.elapsed().as_secs_f64(),
            cluster.dir.path().display()
        );
        cluster
    }

    fn spawn(&mut self, name: &'static str, command: &mut Command) {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("component log");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            // Not the tests' proxy: the apiserver's own clients (webhooks) honour these variables.
            .env_remove("HTTPS_PROXY")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("http_proxy")
            .env("NO_PROXY", "127.0.0.1,localhost")
            // Its own process group, so the watchdog can end it with everything it started.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.components.push(Component { name, child, log });
    }

    /// Ends every component if this test process dies without dropping the cluster (a SIGKILLed test, a runner's
    /// timeout).
    fn start_watchdog(&mut self) {
        let groups: Vec<u32> = self.components.iter().map(|c| c.child.id()).collect();
        self.watchdog = Some(OrphanWatchdog::spawn(&groups));
    }

    fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut(&RealCluster) -> bool,
    ) {
        // Every component started so far is watched: the watchdog learns the later ones when it is restarted.
        self.watchdog = None;
        self.start_watchdog();
        let deadline = Instant::now() + limit;
        loop {
            if ready(self) {
                return;
            }
            for component in &mut self.components {
                if let Ok(Some(status)) = component.child.try_wait() {
                    panic!(
                        "{} exited ({status}) while waiting for {what}; its log:\n{}",
                        component.name,
                        tail(&component.log, 60)
                    );
                }
            }
            if Instant::now() > deadline {
                let logs: String = self
                    .components
                    .iter()
                    .map(|c| format!("--- {} ---\n{}\n", c.name, tail(&c.log, 40)))
                    .collect();
                panic!("timed out after {limit:?} waiting for {what}; logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// etcd's client URL (for `etcdctl`-style compaction through its HTTP gateway).
    pub fn etcd_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_port)
    }

    /// PEM of the CA that signed the API server's certificate and the client certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin kubeconfig file (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The working directory (PKI, etcd data, component logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn admin_kubeconfig_yaml(&self, pki: &Pki) -> String {
        kubeconfig(
            &self.url(),
            &self.ca_pem,
            &format!(
                "client-certificate: {}\n    client-key: {}",
                pki.dir.join("admin.crt").display(),
                pki.dir.join("admin.key").display()
            ),
        )
    }

    /// A kubeconfig for `user`: `None` is the admin (client certificate), `Some(name)` a static token user.
    pub fn kubeconfig_yaml(&self, user: Option<&str>) -> String {
        match user {
            None => std::fs::read_to_string(&self.kubeconfig).expect("admin kubeconfig"),
            Some(name) => {
                let user = self
                    .users
                    .iter()
                    .find(|u| u.name == name)
                    .unwrap_or_else(|| panic!("no token user {name:?} was declared"));
                kubeconfig(&self.url(), &self.ca_pem, &format!("token: {}", user.token))
            }
        }
    }

    /// A kubeconfig for a ServiceAccount, with a bound token from the TokenRequest API (valid for a day).
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> String {
        let out = self.kubectl(&["-n", namespace, "create", "token", name, "--duration=24h"]);
        assert!(
            out.status.success(),
            "kubectl create token {namespace}/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).expect("token");
        kubeconfig(
            &self.url(),
            &self.ca_pem,
            &format!("token: {}", token.trim()),
        )
    }

    /// Writes a kubeconfig (see [`RealCluster::kubeconfig_yaml`]) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, user: Option<&str>) {
        std::fs::write(path, self.kubeconfig_yaml(user)).expect("write kubeconfig");
    }

    /// The real `kubectl` as admin; returns its output whatever the status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_stdin(args, None)
    }

    /// The real `kubectl` as admin with `stdin`; returns its output whatever the status.
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(real_kube_binary("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl starts");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .expect("kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// `kubectl` as admin, panicking with its stderr on failure; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply --server-side -f -` of a multi-document YAML as admin; waits for CRDs it creates to be
    /// Established.
    pub fn apply_yaml(&self, yaml: &str) {
        let out = self.kubectl_with_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        );
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let created = String::from_utf8_lossy(&out.stdout);
        for line in created.lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .and_then(|n| n.strip_prefix("customresourcedefinition.apiextensions.k8s.io/"))
            {
                self.kubectl_ok(&[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    &format!("crd/{name}"),
                ]);
            }
        }
    }

    /// [`RealCluster::apply_yaml`] of every `*.yaml` file of a directory, in name order.
    pub fn apply_dir(&self, dir: &Path) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for file in files {
            self.apply_yaml(&std::fs::read_to_string(&file).expect("manifest"));
        }
    }

    /// The last `lines` lines of a component's log (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        self.components
            .iter()
            .find(|c| c.name == component)
            .map(|c| tail(&c.log, lines))
            .unwrap_or_default()
    }

    /// Resident memory of each component now, in KiB (from /proc).
    pub fn rss_kib(&self) -> Vec<(&'static str, u64)> {
        self.components
            .iter()
            .map(|c| {
                let status = std::fs::read_to_string(format!("/proc/{}/status", c.child.id()))
                    .unwrap_or_default();
                let kib = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                (c.name, kib)
            })
            .collect()
    }
}

impl Drop for RealCluster {
    fn drop(&mut self) {
        for component in self.components.iter_mut().rev() {
            let pid = component.child.id() as i32;
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match component.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = Command::new("kill")
                            .args(["-KILL", "--", &format!("-{pid}")])
                            .status();
                        // The component itself at least, should the group kill have failed.
                        let _ = component.child.kill();
                        let _ = component.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.watchdog = None;
    }
}

fn kubeconfig(server: &str, ca_pem: &str, user: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: real
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: user
  user:
    {user}
contexts:
- name: real
  context: {{cluster: real, user: user}}
current-context: real
"
    )
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The control plane's certificates and keys, written to `{dir}/pki`.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
}

impl Pki {
    fn write(root: &Path, users: &[TokenUser], extra_serving_names: &[String]) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = root.join("pki");
        std::fs::create_dir_all(&dir).expect("pki dir");
        let write =
            |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("pki file");

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "real-kube test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        write("ca.key", &ca_key.serialize_pem());
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-signed CA");
        write("ca.crt", &ca.pem());

        let serving_key = KeyPair::generate().expect("serving key");
        let mut names = vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "10.0.0.1".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ];
        names.extend_from_slice(extra_serving_names);
        let mut serving = CertificateParams::new(names).expect("serving params");
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = serving.signed_by(&serving_key, &ca).expect("serving cert");
        write("apiserver.crt", &serving.pem());
        write("apiserver.key", &serving_key.serialize_pem());

        let admin_key = KeyPair::generate().expect("admin key");
        let mut admin = CertificateParams::new(Vec::<String>::new()).expect("admin params");
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin = admin.signed_by(&admin_key, &ca).expect("admin cert");
        write("admin.crt", &admin.pem());
        write("admin.key", &admin_key.serialize_pem());

        // One key signs and verifies ServiceAccount tokens (ES256).
        let sa_key = KeyPair::generate().expect("service-account key");
        write("sa.key", &sa_key.serialize_pem());
        write("sa.pub", &sa_key.public_key_pem());

        let mut tokens = String::new();
        for user in users {
            let _ = writeln!(
                tokens,
                "{},{},{},\"{}\"",
                user.token,
                user.name,
                user.name,
                user.groups.join(",")
            );
        }
        write("tokens.csv", &tokens);
        Pki {
            ca_pem: ca.pem(),
            dir,
        }
    }
}
