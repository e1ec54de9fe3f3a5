//! The README "Install" section, run as written against a real control plane with the real `helm` CLI:
//!
//! ```text
//! README.md ## Install ```sh block (parsed here: breaks when the README drifts)
//!   kubectl create namespace / create secret (credentials.yaml + token) / helm install / kubectl apply (CRs)
//!   → reverser-writer and reverser-agent as local processes with the arguments and environment the chart rendered
//!     into the Deployments (the Pods stay Pending: no kubelet), authenticated as the chart's ServiceAccounts
//!   → kubectl get gitdestinations,clusterwatchrules -A shows Ready=True, git clone shows the first push
//!   → helm upgrade to createConfiguration=false (the agent registers the webhook configuration, owned by its
//!     ClusterRole), back to true (Helm adopts it), to false again, then helm uninstall: the garbage collector
//!     removes the agent's configuration and nothing labelled with the release is left but what the chart keeps.
//! ```
//!
//! Substitutions, and nothing else: the repository URL (a local HTTPS git server with basic auth), the chart path
//! (this checkout), and one extra `--set writer.git.caBundle.existingSecret=git-ca` because that server's CA is
//! private. Volumes become directories (Secret volumes are written out, `/etc/reverser/…` in file contents and
//! arguments point there), listen addresses become free loopback ports, and the agent dials the writer at 127.0.0.1
//! with `--writer-tls-domain` set to the Service host name the chart rendered (the certificate's name).
//! In-cluster credentials become `--kubeconfig` with a TokenRequest token of the Deployment's ServiceAccount, so a
//! missing RBAC rule is a real 403, which the test reports from the processes' logs.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use testkit::{BareRepo, HttpGitServer, RealCluster, free_port, real_kube_binary};

const RELEASE: &str = "gitops-reverser";
const NAMESPACE: &str = "gitops-reverser";
const README_REPO_URL: &str = "https://github.com/acme/cluster-state.git";
const README_CHART: &str = " charts/gitops-reverser ";
const GIT_USER: &str = "x-access-token";
const GIT_TOKEN: &str = "s3cr3t-t0ken-for-the-test";
const PATIENCE: Duration = Duration::from_secs(120);
/// Where the README's credentials file expects its token (the chart mounts the Secret at /etc/reverser/git).
const CREDENTIALS_YAML: &str = "credentials:\n  - urlPrefix: {URL_PREFIX}\n    username: x-access-token\n    passwordFile: /etc/reverser/git/token\n";

fn repo_root() -> PathBuf {
    testkit::manifest_dir()
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// One command of the README block, with its here-document.
#[derive(Debug)]
struct Step {
    text: String,
    stdin: Option<String>,
}

/// The ```sh block of README.md's "## Install" section, split into commands (comments dropped, `\` continuations
/// joined, `<<'WORD'` here-documents taken as stdin).
fn readme_install_steps() -> Vec<Step> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Install\n")
        .nth(1)
        .expect("README.md has an `## Install` section");
    let section = section.split("\n## ").next().unwrap();
    let block = section
        .split("```sh\n")
        .nth(1)
        .expect("the Install section has a ```sh block")
        .split("\n```")
        .next()
        .unwrap();
    let mut steps = Vec::new();
    let mut lines = block.lines();
    let mut pending = String::new();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(joined) = trimmed.strip_suffix('\\') {
            pending.push_str(joined);
            continue;
        }
        pending.push_str(trimmed);
        let mut text = std::mem::take(&mut pending);
        let mut stdin = None;
        if let Some(at) = text.find("<<'") {
            let word: String = text[at + 3..].chars().take_while(|c| *c != '\'').collect();
            let mut doc = String::new();
            for body in lines.by_ref() {
                if body.trim() == word {
                    break;
                }
                doc.push_str(body);
                doc.push('\n');
            }
            text = format!("{}{}", &text[..at], &text[at + 3 + word.len() + 1..]);
            stdin = Some(doc);
        }
        steps.push(Step { text, stdin });
    }
    steps
}

/// The README's commands run with the real binaries first on PATH, the admin kubeconfig and a private Helm home.
struct Shell {
    cwd: PathBuf,
    env: Vec<(String, String)>,
}

impl Shell {
    fn new(cluster: &RealCluster, cwd: &Path) -> Self {
        let bin = real_kube_binary("helm").parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let helm_home = cwd.join(".helm");
        let mut env = vec![
            ("PATH".to_owned(), path),
            (
                "KUBECONFIG".to_owned(),
                cluster.kubeconfig().display().to_string(),
            ),
            ("HOME".to_owned(), cwd.display().to_string()),
        ];
        for (var, sub) in [
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ] {
            env.push((var.to_owned(), helm_home.join(sub).display().to_string()));
        }
        Shell {
            cwd: cwd.to_owned(),
            env,
        }
    }

    /// `bash -c text`; returns (success, stdout, stderr).
    fn run(
        &self,
        text: &str,
        stdin: Option<&str>,
        extra_env: &[(&str, String)],
    ) -> (bool, String, String) {
        use std::io::Write as _;
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", text])
            .current_dir(&self.cwd)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("bash starts");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .expect("stdin");
        }
        let out = child.wait_with_output().expect("bash output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, text: &str) -> String {
        let (ok, stdout, stderr) = self.run(text, None, &[]);
        assert!(ok, "`{text}` failed:\n{stderr}\n{stdout}");
        stdout
    }
}

fn kubectl_json(cluster: &RealCluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cluster.kubectl_ok(&all)).expect("kubectl JSON")
}

fn wait_until<T>(
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    on_timeout: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            on_timeout()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A container of a rendered Deployment, run as a local process: its volumes as directories, its arguments with
/// those paths and free loopback ports, its ServiceAccount's token as the kubeconfig.
struct Component {
    name: &'static str,
    child: RefCell<Child>,
    log: PathBuf,
}

impl Component {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn assert_running(&self) {
        if let Ok(Some(status)) = self.child.borrow_mut().try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.tail());
        }
    }

    /// SIGTERM (what the kubelet sends), then SIGKILL after a grace.
    fn stop(self) -> String {
        let mut child = self.child.borrow_mut();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        drop(child);
        self.log()
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What the chart rendered for one Deployment, translated for a local process.
struct Rendered {
    args: Vec<String>,
    env: BTreeMap<String, String>,
    service_account: String,
}

/// `text` with every absolute path under a mount point (one that starts after a non-path character) moved to
/// the mount's local directory, in one pass.
fn relocate(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    let mut previous: Option<char> = None;
    'scan: while !rest.is_empty() {
        let starts_path = !previous.is_some_and(|c| c.is_alphanumeric() || "/._-~".contains(c));
        if starts_path {
            for (mount_path, local) in mounts {
                let ends_at_boundary = |tail: &str| {
                    tail.is_empty()
                        || !tail.starts_with(|c: char| c.is_alphanumeric() || "._-".contains(c))
                };
                if let Some(tail) = rest.strip_prefix(mount_path.as_str())
                    && ends_at_boundary(tail)
                {
                    out.push_str(&local.display().to_string());
                    previous = mount_path.chars().last();
                    rest = tail;
                    continue 'scan;
                }
            }
        }
        let c = rest.chars().next().unwrap();
        out.push(c);
        previous = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Reads `deployment` from the cluster (what Helm applied), writes its volumes under `root` and translates the
/// container's arguments. `ports` maps a listen flag to the loopback port it gets.
fn render_for_local_run(
    cluster: &RealCluster,
    deployment: &str,
    root: &Path,
    ports: &BTreeMap<&str, u16>,
) -> Rendered {
    let deploy = kubectl_json(cluster, &["-n", NAMESPACE, "get", "deployment", deployment]);
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let mount_path = mount["mountPath"].as_str().unwrap().to_owned();
        let local = root.join(mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&local).unwrap();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{deployment}: volume {} is not declared", mount["name"]));
        if let Some(secret) = volume.get("secret") {
            let name = secret["secretName"].as_str().unwrap();
            let data = kubectl_json(cluster, &["-n", NAMESPACE, "get", "secret", name]);
            let data = data["data"].as_object().cloned().unwrap_or_default();
            let items: Vec<(String, String)> = match secret["items"].as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        (
                            i["key"].as_str().unwrap().into(),
                            i["path"].as_str().unwrap().into(),
                        )
                    })
                    .collect(),
                None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in items {
                let encoded = data
                    .get(&key)
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{deployment}: Secret {name} has no key {key}"));
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .expect("Secret data is base64");
                std::fs::write(local.join(path), bytes).unwrap();
            }
        }
        mounts.push((mount_path, local));
    }
    // Longest mount first, so a nested mount wins over its parent.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    // File contents refer to mounted paths too (the credentials file names its token file).
    for (_, local) in &mounts {
        for entry in std::fs::read_dir(local).unwrap().flatten() {
            if let Ok(text) = std::fs::read_to_string(entry.path())
                && !text.contains("-----BEGIN")
            {
                let moved = relocate(&text, &mounts);
                if moved != text {
                    std::fs::write(entry.path(), moved).unwrap();
                }
            }
        }
    }
    let mut args = Vec::new();
    let mut writer_host = None;
    for arg in container["args"].as_array().expect("args") {
        let arg = relocate(arg.as_str().unwrap(), &mounts);
        let flag = arg.split('=').next().unwrap().to_owned();
        if let Some(port) = ports.get(flag.as_str()) {
            args.push(format!("{flag}=127.0.0.1:{port}"));
        } else if flag == "--writer-url" {
            let url = arg.split_once('=').unwrap().1;
            let (scheme, rest) = url.split_once("://").expect("writer URL scheme");
            writer_host = Some(rest.rsplit_once(':').unwrap().0.to_owned());
            args.push(format!(
                "--writer-url={scheme}://127.0.0.1:{}",
                ports["writer"]
            ));
        } else {
            args.push(arg);
        }
    }
    if let Some(host) = writer_host
        && !args.iter().any(|a| a.starts_with("--writer-tls-domain"))
    {
        args.push(format!("--writer-tls-domain={host}"));
    }
    let selector = deploy["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            value.to_owned()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                // The newest Pod of the Deployment (Pending here): the name a running container would have.
                Some("metadata.name") => {
                    let pods = cluster.kubectl_ok(&[
                        "-n",
                        NAMESPACE,
                        "get",
                        "pods",
                        "-l",
                        &selector,
                        "--sort-by=.metadata.creationTimestamp",
                        "-o",
                        "jsonpath={.items[*].metadata.name}",
                    ]);
                    pods.split_whitespace()
                        .last()
                        .unwrap_or_else(|| panic!("{deployment} has no Pod"))
                        .to_owned()
                }
                Some("metadata.namespace") => NAMESPACE.to_owned(),
                other => panic!("{deployment}: env {name} from {other:?} is not translated"),
            }
        };
        env.insert(name, value);
    }
    Rendered {
        args,
        env,
        service_account: pod["serviceAccountName"].as_str().unwrap().to_owned(),
    }
}

fn spawn(
    cluster: &RealCluster,
    name: &'static str,
    binary: &Path,
    rendered: &Rendered,
    dir: &Path,
) -> Component {
    let kubeconfig = dir.join(format!("{name}-{}.kubeconfig", rendered.service_account));
    std::fs::write(
        &kubeconfig,
        cluster.service_account_kubeconfig(NAMESPACE, &rendered.service_account),
    )
    .unwrap();
    let log = dir.join(format!("{name}-{}.log", free_port()));
    let out = File::create(&log).unwrap();
    let child = Command::new(binary)
        .args(&rendered.args)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&rendered.env)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{} starts: {e}", binary.display()));
    Component {
        name,
        child: RefCell::new(child),
        log,
    }
}

/// The writer binary of this build (`cargo build -p reverser-writer`; the workspace test run builds it).
fn writer_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("reverser-writer");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p reverser-writer`",
        path.display()
    );
    path
}

fn agent_ports() -> BTreeMap<&'static str, u16> {
    BTreeMap::from([
        ("--admin-addr", free_port()),
        ("--webhook-addr", free_port()),
    ])
}

fn start_agent(cluster: &RealCluster, dir: &Path, writer_port: u16, run: usize) -> Component {
    let mut ports = agent_ports();
    ports.insert("writer", writer_port);
    let root = dir.join(format!("agent-root-{run}"));
    let rendered = render_for_local_run(cluster, &format!("{RELEASE}-agent"), &root, &ports);
    spawn(
        cluster,
        "agent",
        Path::new(env!("CARGO_BIN_EXE_reverser-agent")),
        &rendered,
        dir,
    )
}

/// Lines of a log that say the API server refused a request (an RBAC gap).
fn forbidden_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let lower = l.to_lowercase();
            lower.contains("forbidden") || lower.contains(" 403") || lower.contains("code: 403")
        })
        .map(str::to_owned)
        .collect()
}

/// Every data row of each table `kubectl get a,b -A` prints has `True` in its READY column.
fn all_ready(table: &str) -> bool {
    let mut rows = 0;
    let mut column = None;
    for line in table.lines() {
        if line.trim().is_empty() {
            column = None;
            continue;
        }
        if line.starts_with("NAMESPACE") || line.starts_with("NAME ") {
            column = line.find("READY");
            if column.is_none() {
                return false;
            }
            continue;
        }
        let Some(at) = column else { return false };
        let value: String = line
            .get(at..)
            .unwrap_or("")
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        if value != "True" {
            return false;
        }
        rows += 1;
    }
    rows >= 2
}

fn vwc(cluster: &RealCluster) -> Option<Value> {
    let out = cluster.kubectl(&[
        "get",
        "validatingwebhookconfiguration",
        RELEASE,
        "--ignore-not-found",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    (!text.trim().is_empty()).then(|| serde_json::from_str(&text).unwrap())
}

/// `helm upgrade` keeping the README's values and setting one more; returns (success, output).
fn helm_upgrade(shell: &Shell, chart: &Path, set: &str, extra: &str) -> (bool, String) {
    let (ok, stdout, stderr) = shell.run(
        &format!(
            "helm upgrade {RELEASE} {} -n {NAMESPACE} --reuse-values --set {set} {extra}",
            chart.display()
        ),
        None,
        &[],
    );
    (ok, format!("{stdout}{stderr}"))
}

#[test]
fn readme_install_then_upgrade_and_uninstall_on_a_real_cluster() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let steps = readme_install_steps();
    let programs: Vec<String> = steps
        .iter()
        .map(|s| {
            s.text
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for expected in [
        "kubectl create",
        "helm install",
        "kubectl apply",
        "kubectl get",
        "git clone",
    ] {
        assert!(
            programs.iter().any(|p| p == expected),
            "the README Install block no longer has a `{expected}` step: {programs:?}"
        );
    }

    let cluster = RealCluster::builder().start_blocking();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("readme");
    std::fs::create_dir_all(&work).unwrap();
    let bare = BareRepo::named("cluster-state.git");
    let server = HttpGitServer::start(&bare, GIT_USER, GIT_TOKEN);
    let repo_url = server.url();
    let chart = repo_root().join("charts/gitops-reverser");
    // The files the README's `kubectl create secret --from-file` picks up (format: README "Transports and
    // credentials", token file at the chart's mount path).
    std::fs::write(
        work.join("credentials.yaml"),
        CREDENTIALS_YAML.replace(
            "{URL_PREFIX}",
            &format!("https://127.0.0.1:{}/", server.port()),
        ),
    )
    .unwrap();
    std::fs::write(work.join("token"), GIT_TOKEN).unwrap();
    std::fs::write(work.join("git-ca.crt"), server.ca_pem()).unwrap();
    let shell = Shell::new(&cluster, &work);
    let writer_port = free_port();
    let mut writer: Option<Component> = None;
    let mut agent: Option<Component> = None;
    let logs = |writer: &Option<Component>, agent: &Option<Component>| {
        format!(
            "--- writer ---\n{}\n--- agent ---\n{}",
            writer.as_ref().map(Component::tail).unwrap_or_default(),
            agent.as_ref().map(Component::tail).unwrap_or_default()
        )
    };

    let mut ready_table = String::new();
    // 1.–4. The README, command by command.
    for step in &steps {
        let text = step
            .text
            .replace(README_REPO_URL, &repo_url)
            .replace(README_CHART, &format!(" {} ", chart.display()));
        let stdin = step
            .stdin
            .as_ref()
            .map(|s| s.replace(README_REPO_URL, &repo_url));
        if text.starts_with("helm install") {
            shell.ok(&format!(
                "kubectl -n {NAMESPACE} create secret generic git-ca --from-file=ca.crt=git-ca.crt"
            ));
            let text = format!("{text} --set writer.git.caBundle.existingSecret=git-ca");
            let (ok, stdout, stderr) = shell.run(&text, None, &[]);
            assert!(ok, "`{text}` failed:\n{stderr}\n{stdout}");
            // The Pods stay Pending (no kubelet): run their containers here, as the chart rendered them.
            let rendered = render_for_local_run(
                &cluster,
                &format!("{RELEASE}-writer"),
                &dir.path().join("writer-root"),
                &BTreeMap::from([("--grpc-addr", writer_port), ("--admin-addr", free_port())]),
            );
            writer = Some(spawn(
                &cluster,
                "writer",
                &writer_binary(),
                &rendered,
                dir.path(),
            ));
            agent = Some(start_agent(&cluster, dir.path(), writer_port, 0));
        } else if text.starts_with("kubectl get") {
            // The same command until every row says Ready=True.
            let table = wait_until(
                "Ready=True on every GitDestination and ClusterWatchRule",
                || {
                    agent.as_ref().unwrap().assert_running();
                    writer.as_ref().unwrap().assert_running();
                    let (ok, stdout, _) = shell.run(&text, None, &[]);
                    (ok && all_ready(&stdout)).then_some(stdout)
                },
                || {
                    format!(
                        "{}\n{}",
                        shell.run(&text, None, &[]).1,
                        logs(&writer, &agent)
                    )
                },
            );
            ready_table = table;
            // Ready=True means the writer accepted the destination; the first commit follows within the batch
            // window (writer.git.batch.maxWaitSec, 20 s by default).
            wait_until(
                "the first push",
                || {
                    writer.as_ref().unwrap().assert_running();
                    bare.rev_parse("main")
                },
                || logs(&writer, &agent),
            );
        } else if text.starts_with("git clone") {
            // The clone authenticates like any client of that server would (its CA, the token).
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{GIT_USER}:{GIT_TOKEN}"));
            let env = [
                (
                    "GIT_SSL_CAINFO",
                    work.join("git-ca.crt").display().to_string(),
                ),
                ("GIT_CONFIG_COUNT", "1".to_owned()),
                ("GIT_CONFIG_KEY_0", "http.extraHeader".to_owned()),
                (
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: Basic {basic}"),
                ),
            ];
            let (ok, stdout, stderr) = shell.run(&text, None, &env);
            assert!(
                ok,
                "`{text}` failed:\n{stderr}\n{stdout}\n{ready_table}\n{}",
                logs(&writer, &agent)
            );
            assert!(
                work.join("cluster-state/clusters/prod").is_dir(),
                "the clone has no clusters/prod:\n{stdout}"
            );
        } else {
            let (ok, stdout, stderr) = shell.run(&text, stdin.as_deref(), &[]);
            assert!(ok, "`{text}` failed:\n{stderr}\n{stdout}");
        }
    }
    let files = bare.ls_tree("main");
    assert!(
        files.iter().any(|f| f.starts_with("clusters/prod/")),
        "the mirrored files: {files:?}"
    );

    // The chart's ServiceAccounts: no RBAC gap on the way to the first push, and no Secret access the default
    // chart's features do not need (the writer reads its files, never the API; the agent only `get`s the Secrets
    // a GitRepoConfig names and lists none).
    for (component, log) in [
        ("writer", writer.as_ref().unwrap().log()),
        ("agent", agent.as_ref().unwrap().log()),
    ] {
        let denied = forbidden_lines(&log);
        assert!(
            denied.is_empty(),
            "the {component} got 403s:\n{}",
            denied.join("\n")
        );
    }
    for (sa, verb, expected) in [
        ("gitops-reverser-writer", "get", "no"),
        ("gitops-reverser-writer", "list", "no"),
        ("gitops-reverser-agent", "list", "no"),
        ("gitops-reverser-agent", "watch", "no"),
        ("gitops-reverser-agent", "create", "no"),
    ] {
        let out = cluster.kubectl(&[
            "auth",
            "can-i",
            verb,
            "secrets",
            "-A",
            &format!("--as=system:serviceaccount:{NAMESPACE}:{sa}"),
        ]);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(answer, expected, "can {sa} {verb} Secrets?");
    }

    // 5. helm upgrade with a changed value: the agent manages the webhook configuration, owned by its ClusterRole.
    let chart_made = vwc(&cluster).expect("the chart created the webhook configuration");
    assert!(chart_made["metadata"].get("ownerReferences").is_none());
    let (ok, out) = helm_upgrade(
        &shell,
        &chart,
        "agent.webhook.createConfiguration=false",
        "",
    );
    assert!(ok, "helm upgrade to createConfiguration=false: {out}");
    assert!(vwc(&cluster).is_none(), "Helm removes its configuration");
    agent.take().unwrap().stop();
    agent = Some(start_agent(&cluster, dir.path(), writer_port, 1));
    let role = kubectl_json(
        &cluster,
        &["get", "clusterrole", &format!("{RELEASE}-agent")],
    );
    let role_uid = role["metadata"]["uid"].as_str().unwrap().to_owned();
    let applied = wait_until(
        "the agent's webhook configuration",
        || {
            agent.as_ref().unwrap().assert_running();
            vwc(&cluster)
        },
        || logs(&writer, &agent),
    );
    let owners = &applied["metadata"]["ownerReferences"];
    assert_eq!(owners[0]["kind"], "ClusterRole", "{owners}");
    assert_eq!(owners[0]["uid"], role_uid.as_str(), "{owners}");

    // 6. Back to the chart with the real helm CLI: it adopts the agent's configuration. Helm 4 installed the
    // release with server-side apply, and the agent's field manager owns the rules it set: the plain upgrade is
    // refused with a field conflict (not "cannot be imported": the ownership metadata works), and
    // `--force-conflicts` (chart README) takes the fields over.
    let (ok, out) = helm_upgrade(&shell, &chart, "agent.webhook.createConfiguration=true", "");
    if !ok {
        assert!(
            out.contains("conflict")
                && out.contains(".rules")
                && !out.contains("cannot be imported"),
            "helm upgrade back to createConfiguration=true failed for another reason than a field conflict: {out}"
        );
        let (ok, out) = helm_upgrade(
            &shell,
            &chart,
            "agent.webhook.createConfiguration=true",
            "--force-conflicts",
        );
        assert!(
            ok,
            "helm upgrade --force-conflicts back to createConfiguration=true: {out}"
        );
    }
    let adopted = vwc(&cluster).expect("the chart's configuration");
    assert_eq!(
        adopted["webhooks"][0]["rules"][0]["resources"],
        serde_json::json!(["*"]),
        "the chart's broad rules"
    );
    agent.take().unwrap().stop();

    // 7. To the agent again, then uninstall: the garbage collector follows the ownerReference.
    let (ok, out) = helm_upgrade(
        &shell,
        &chart,
        "agent.webhook.createConfiguration=false",
        "",
    );
    assert!(ok, "helm upgrade to createConfiguration=false again: {out}");
    assert!(
        vwc(&cluster).is_none(),
        "Helm removes the configuration it adopted"
    );
    agent = Some(start_agent(&cluster, dir.path(), writer_port, 2));
    wait_until(
        "the agent's webhook configuration again",
        || {
            agent.as_ref().unwrap().assert_running();
            vwc(&cluster)
                .filter(|v| v["metadata"]["ownerReferences"][0]["uid"] == role_uid.as_str())
        },
        || logs(&writer, &agent),
    );
    for (component, log) in [
        ("writer", writer.as_ref().unwrap().log()),
        ("agent", agent.as_ref().unwrap().log()),
    ] {
        let denied = forbidden_lines(&log);
        assert!(
            denied.is_empty(),
            "the {component} got 403s:\n{}",
            denied.join("\n")
        );
    }

    // Each Lease is owned by the Role that grants the right to hold it.
    let leases: Value = serde_json::from_str(
        &cluster.kubectl_ok(&["get", "leases", "-n", NAMESPACE, "-o", "json"]),
    )
    .expect("lease list");
    let owners: BTreeMap<String, String> = leases["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|lease| {
            (
                lease["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                lease["metadata"]["ownerReferences"][0]["name"]
                    .as_str()
                    .unwrap_or("<none>")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        owners.len(),
        2,
        "the agent's and the writer's Lease: {owners:?}"
    );
    assert_eq!(
        owners.get("gitops-reverser-agent").map(String::as_str),
        Some("gitops-reverser-agent"),
        "{owners:?}"
    );
    assert!(
        owners
            .iter()
            .any(|(name, owner)| name != "gitops-reverser-agent"
                && owner == "gitops-reverser-writer"),
        "{owners:?}"
    );

    shell.ok(&format!("helm uninstall {RELEASE} -n {NAMESPACE}"));
    // The Pods are gone: their containers get SIGTERM.
    agent.take().unwrap().stop();
    writer.take().unwrap().stop();
    wait_until(
        "the garbage collector to delete the agent's webhook configuration",
        || vwc(&cluster).is_none().then_some(()),
        || cluster.log_tail("kube-controller-manager", 40),
    );
    wait_until(
        "the garbage collector to delete the Leases",
        || {
            cluster
                .kubectl_ok(&["get", "leases", "-n", NAMESPACE, "-o", "name"])
                .trim()
                .is_empty()
                .then_some(())
        },
        || cluster.log_tail("kube-controller-manager", 40),
    );

    // Nothing labelled with the release is left, in any namespace, of any listable type, but the CA Secret the
    // chart keeps on purpose (helm.sh/resource-policy: keep). The CRDs stay (Helm never deletes crds/).
    let resources = cluster.kubectl_ok(&["api-resources", "--verbs=list", "-o", "name"]);
    let resources: Vec<&str> = resources
        .lines()
        .filter(|r| !r.starts_with("events"))
        .collect();
    let left = cluster.kubectl_ok(&[
        "get",
        &resources.join(","),
        "-A",
        "-l",
        &format!("app.kubernetes.io/instance={RELEASE}"),
        "-o",
        "name",
    ]);
    let left: Vec<&str> = left.lines().collect();
    assert_eq!(
        left,
        vec![format!("secret/{RELEASE}-ca").as_str()],
        "left behind"
    );
    for kind in [
        "clusterrole",
        "clusterrolebinding",
        "validatingwebhookconfiguration",
    ] {
        let names = cluster.kubectl_ok(&["get", kind, "-o", "name"]);
        assert!(
            !names.contains(RELEASE),
            "a {kind} of the release is left: {names}"
        );
    }
    // The release namespace holds only what the README's user created, the cluster's own defaults and the Leases:
    // no Pod, ReplicaSet, Endpoint(Slice), Service, ConfigMap or Secret of the agent or the writer is left.
    let namespaced = cluster.kubectl_ok(&[
        "api-resources",
        "--namespaced=true",
        "--verbs=list",
        "-o",
        "name",
    ]);
    let namespaced: Vec<&str> = namespaced
        .lines()
        .filter(|r| !r.starts_with("events"))
        .collect();
    let in_namespace =
        cluster.kubectl_ok(&["get", &namespaced.join(","), "-n", NAMESPACE, "-o", "name"]);
    // The agent's leader Lease and the writer's per-branch Lease were owned by the Roles Helm deleted: the garbage
    // collector deletes them too (checked above to exist and carry those owners before the uninstall).
    let mut in_namespace: Vec<&str> = in_namespace.lines().collect();
    assert!(
        !in_namespace
            .iter()
            .any(|name| name.starts_with("lease.coordination.k8s.io/")),
        "a Lease is left: {in_namespace:?}"
    );
    in_namespace.sort_unstable();
    let mut expected = vec![
        "configmap/kube-root-ca.crt",
        "gitdestination.configbutler.ai/prod",
        "gitrepoconfig.configbutler.ai/infra",
        "secret/git-ca",
        "secret/git-credentials",
        "secret/gitops-reverser-ca",
        "serviceaccount/default",
    ];
    expected.sort_unstable();
    assert_eq!(in_namespace, expected, "left in the release namespace");
    // Helm keeps the CRDs of its crds/ folder on uninstall: every one the chart ships.
    let crds = cluster.kubectl_ok(&["get", "crd", "-o", "name"]);
    let shipped = std::fs::read_dir(testkit::workspace_root().join("charts/gitops-reverser/crds"))
        .expect("the chart's crds folder")
        .count();
    assert_eq!(shipped, 5, "the chart ships the five configbutler CRDs");
    assert_eq!(crds.matches(".configbutler.ai").count(), shipped, "{crds}");
}
