//! What the agent benchmarks share (`e2e.rs`, `real_seed.rs`): the benchmark corpus's agent configuration, the
//! release agent as a child process, the writer in-process or as a child process, a bare repository's tip
//! watched incrementally, `/proc` readings (RSS, CPU, load) and the result table.
//!
//! Each bench uses a part of it.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use testkit::corpus;
use tokio::process::{Child, Command};

pub const BRANCH: &str = "main";
pub const BASE: &str = "clusters/prod";
/// The destination key the agent derives from the GitDestination (namespace/name).
pub const DEST: &str = "gitops-reverser/prod";
pub const POLL: Duration = Duration::from_millis(100);
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
pub const MIRRORED: [&str; 2] = [
    "clusters/prod/core/v1/configmaps",
    "clusters/prod/apps/v1/deployments",
];

pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}
// ---------------------------------------------------------------------------------------------
// The corpus: `testkit::corpus`, the objects the writer's seed benchmark uses, as the API server stores them.

pub fn object_path(i: usize) -> String {
    format!("{BASE}/{}", corpus::path(i))
}

pub fn agent_config(repo_url: &str) -> String {
    format!(
        "
apiVersion: v1
kind: Namespace
metadata: {{name: gitops-reverser}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitRepoConfig
metadata: {{name: repo, namespace: gitops-reverser}}
spec:
  repoUrl: '{repo_url}'
  allowedBranches: [{BRANCH}]
  accessPolicy: {{allowClusterRules: true}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: {BASE}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: bench}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{scope: Namespaced, apiGroups: ['', apps], resources: [configmaps, deployments]}}]
"
    )
}
// ---------------------------------------------------------------------------------------------
// Measurements.

/// The 1-minute load average now.
pub fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

pub fn uptime() -> String {
    std::process::Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| format!("load {}", load1()))
}

/// Two memory fields of a process's `/proc/PID/status` (`"VmRSS:"`, …), in MiB.
fn status_mib(pid: u32, keys: [&str; 2]) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?;
            let kb: f64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb / 1024.0)
        })
    };
    Some((field(keys[0])?, field(keys[1])?))
}

/// `(VmRSS, VmHWM)` of a process in MiB.
pub fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    status_mib(pid, ["VmRSS:", "VmHWM:"])
}

/// `(RssAnon, RssFile)` of a process in MiB: its heap and stacks versus the files it maps (a writer's mapped pack
/// windows count here), to tell memory it holds from pages the kernel can drop.
pub fn rss_parts_mib(pid: u32) -> Option<(f64, f64)> {
    status_mib(pid, ["RssAnon:", "RssFile:"])
}

pub use testkit::{cpu_secs, free_port, http_get, metric, metric_sum};

pub async fn git(repo: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running git")
}

/// Counts the mirrored files at a bare repo's tip, incrementally: each new tip is diffed
/// against the previous one, so a poll costs what changed, not the repository's size.
pub struct TipCounter {
    repo: PathBuf,
    tip: Option<String>,
    files: i64,
    pub commits_seen: usize,
    /// Counts only the paths it accepts.
    only: fn(&str) -> bool,
}

impl TipCounter {
    pub fn new(repo: PathBuf) -> Self {
        TipCounter {
            repo,
            tip: None,
            files: 0,
            commits_seen: 0,
            only: |_| true,
        }
    }

    /// Counts only the files whose path `only` accepts (e.g. the corpus's, not a cluster's own objects).
    pub fn only(mut self, only: fn(&str) -> bool) -> Self {
        self.only = only;
        self
    }

    pub async fn tip(&self) -> anyhow::Result<Option<String>> {
        let out = git(
            &self.repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{BRANCH}"),
            ],
        )
        .await?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }

    /// Re-reads the tip; returns the file count.
    pub async fn poll(&mut self) -> anyhow::Result<i64> {
        let Some(tip) = self.tip().await? else {
            return Ok(0);
        };
        if self.tip.as_deref() == Some(tip.as_str()) {
            return Ok(self.files);
        }
        let old = self.tip.clone().unwrap_or_else(|| EMPTY_TREE.to_owned());
        let mut args = vec![
            "diff-tree",
            "-r",
            "--no-commit-id",
            "--name-status",
            old.as_str(),
            tip.as_str(),
            "--",
        ];
        args.extend(MIRRORED);
        let out = git(&self.repo, &args).await?;
        if !out.status.success() {
            bail!("git diff-tree: {}", String::from_utf8_lossy(&out.stderr));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line.split_once('\t').map_or("", |(_, p)| p);
            if !(self.only)(path) {
                continue;
            }
            match line.as_bytes().first() {
                Some(b'A') => self.files += 1,
                Some(b'D') => self.files -= 1,
                _ => {}
            }
        }
        self.commits_seen += 1;
        self.tip = Some(tip);
        Ok(self.files)
    }
}

pub async fn tree_id(repo: &Path, path: &str) -> String {
    match git(repo, &["rev-parse", &format!("{BRANCH}:{path}")]).await {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => "-".into(),
    }
}

pub async fn commit_count(repo: &Path) -> usize {
    match git(repo, &["rev-list", "--count", BRANCH]).await {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        Err(_) => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Writers.

pub async fn start_writer(work: &Path) -> anyhow::Result<reverser_writer::RunningWriter> {
    let work = work.display().to_string();
    let args = reverser_writer::Args::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--git-batch-max-wait-sec",
        "1",
        "--leases",
        "off",
    ])?;
    args.start().await
}
// ---------------------------------------------------------------------------------------------
// The agent child.

pub struct Agent {
    pub child: Child,
    pub pid: u32,
    pub admin: String,
    /// Kills the agent should the bench itself be killed (SIGKILL, a timeout), when `kill_on_drop` cannot.
    _orphan_watchdog: testkit::OrphanWatchdog,
}

impl Agent {
    pub fn start(bin: &Path, writer_url: &str, kubeconfig: &Path) -> anyhow::Result<Agent> {
        let level = std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into());
        Self::start_logging(bin, writer_url, kubeconfig, None, &level)
    }

    /// [`Agent::start`] at log `level`, its log going to `log` instead of the bench's stderr.
    pub fn start_logging(
        bin: &Path,
        writer_url: &str,
        kubeconfig: &Path,
        log: Option<&Path>,
        level: &str,
    ) -> anyhow::Result<Agent> {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path)?),
            None => Stdio::inherit(),
        };
        let port = free_port();
        let admin = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .arg("--writer-url")
            .arg(writer_url)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--admin-addr")
            .arg(&admin)
            .args(["--cluster-name", "bench"])
            .args(["--controller-namespace", "gitops-reverser"])
            .arg("--leader-election=false")
            .env("AGENT_LOG_LEVEL", level)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            // Its own group, for the orphan watchdog.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("agent pid")?;
        Ok(Agent {
            child,
            pid,
            admin,
            _orphan_watchdog: testkit::OrphanWatchdog::spawn(&[pid]),
        })
    }

    pub async fn metrics(&self) -> Option<String> {
        http_get(&self.admin, "/metrics").await
    }

    /// (produced, acked) when everything produced was acked and every watch listed once.
    pub async fn settled_totals(&self) -> Option<(u64, u64)> {
        let text = self.metrics().await?;
        let m = |name: &str| metric(&text, name);
        let produced: f64 = ["upsert", "delete", "snapshot_begin", "snapshot_end"]
            .iter()
            .map(|k| {
                m(&format!(
                    "gitops_reverser_agent_events_total{{kind=\"{k}\"}}"
                ))
            })
            .sum();
        let acked = m("gitops_reverser_agent_stream_messages_acked_total");
        let settled = m("gitops_reverser_agent_active_watches") > 0.0
            && m("gitops_reverser_agent_watch_snapshots_completed")
                >= m("gitops_reverser_agent_active_watches")
            && m("gitops_reverser_agent_stream_connected") == 1.0
            && m("gitops_reverser_agent_stream_unacked") == 0.0
            && produced > 0.0
            && acked >= produced;
        settled.then_some((produced as u64, acked as u64))
    }

    /// Same settled totals on two reads a metrics pump tick (1 s) apart.
    pub async fn settle(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = None;
        loop {
            let current = self.settled_totals().await;
            if current.is_some() && current == last {
                return Ok(started.elapsed());
            }
            last = current;
            if started.elapsed() > timeout {
                bail!("the agent did not settle within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }

    pub async fn unacked(&self) -> Option<f64> {
        let text = self.metrics().await?;
        Some(metric(&text, "gitops_reverser_agent_stream_unacked"))
    }

    pub async fn terminate(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// One row of the result table.
pub struct Row {
    pub what: String,
    pub value: String,
    pub target: String,
    pub met: String,
    pub load: String,
}

pub fn row(what: impl Into<String>, value: impl Into<String>, load: &str) -> Row {
    Row {
        what: what.into(),
        value: value.into(),
        target: String::new(),
        met: String::new(),
        load: load.to_owned(),
    }
}

pub fn judged(
    what: impl Into<String>,
    value: impl Into<String>,
    target: &str,
    ok: bool,
    load: &str,
) -> Row {
    Row {
        what: what.into(),
        value: value.into(),
        target: target.into(),
        met: if ok { "yes" } else { "**no**" }.into(),
        load: load.to_owned(),
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Prints the result table (markdown) with the machine load at start and end.
pub fn print_table(title: &str, uptime_start: &str, uptime_end: &str, rows: &[Row]) {
    println!("\n## {title}\n");
    println!("start: `{uptime_start}`  ");
    println!("end:   `{uptime_end}`\n");
    println!("| measurement | value | target | met | load (1 min) |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.what, r.value, r.target, r.met, r.load
        );
    }
}

/// `---`-separated Namespaces `ns-00`… of the corpus.
pub fn namespaces_yaml() -> String {
    (0..corpus::namespaces())
        .map(|i| format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{i:02}\n"))
        .collect()
}

/// Manifest of corpus object `i` as it is created: even ConfigMaps, odd Deployments.
pub fn corpus_manifest(i: usize) -> String {
    if i.is_multiple_of(2) {
        corpus::configmap(i, "s0")
    } else {
        corpus::deployment(i, "s0")
    }
}

/// Applies a multi-document manifest in chunks of at most 500 documents: one request's YAML may hold at most
/// 1,024 (the parser's budget), and the scale scenario creates 10,000 namespaces. The bench's own manifests only:
/// a document separator is a line `---`.
pub async fn apply_yaml_chunked(emu: &kube_emulator::Emulator, yaml: &str) -> anyhow::Result<()> {
    let mut chunk = String::new();
    let mut documents = 0;
    for line in yaml.lines() {
        if line == "---" {
            documents += 1;
            if documents > 500 {
                emu.apply_yaml(&chunk).await?;
                chunk.clear();
                documents = 1;
            }
        }
        chunk.push_str(line);
        chunk.push('\n');
    }
    if !chunk.trim().is_empty() {
        emu.apply_yaml(&chunk).await?;
    }
    Ok(())
}

/// Loads `n` corpus objects into the emulator in chunks of 1000; returns the manifests' bytes.
pub async fn load_emulator(emu: &kube_emulator::Emulator, n: usize) -> anyhow::Result<usize> {
    apply_yaml_chunked(emu, &namespaces_yaml()).await?;
    let mut bytes = 0usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut docs = String::new();
        for &i in chunk {
            let doc = corpus_manifest(i);
            bytes += doc.len();
            docs.push_str("---\n");
            docs.push_str(&doc);
        }
        emu.apply_yaml(&docs).await?;
    }
    Ok(bytes)
}

/// Waits until `counter` counts `n` files in its repository's pushed tip; samples `sample` every poll. Returns the time since
/// `started` and when the first file was pushed.
pub async fn wait_for_seed(
    mut counter: TipCounter,
    n: usize,
    started: Instant,
    timeout: Duration,
    agent: &mut Agent,
    mut sample: impl FnMut(),
) -> anyhow::Result<(Duration, Option<Duration>)> {
    let mut first_commit = None;
    loop {
        let files = counter.poll().await?;
        if files > 0 && first_commit.is_none() {
            first_commit = Some(started.elapsed());
        }
        sample();
        if files >= n as i64 {
            return Ok((started.elapsed(), first_commit));
        }
        if let Some(status) = agent.child.try_wait()? {
            bail!("the agent exited during the seed: {status}");
        }
        if started.elapsed() > timeout {
            bail!(
                "agent seed timed out after {timeout:?}: {files}/{n} files in {} tips",
                counter.commits_seen
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Set in the environment of the bench binary started again as a writer ([`WriterProcess`]).
const WRITER_CHILD: &str = "REVERSER_BENCH_WRITER_CHILD";

/// When this process was started as a [`WriterProcess`]: runs the writer with the command line's flags (as the
/// `reverser-writer` binary does) and returns its result; `None` otherwise. The bench's `main` calls it first.
pub fn run_as_writer_child() -> Option<anyhow::Result<()>> {
    std::env::var_os(WRITER_CHILD)?;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Some(Err(e.into())),
    };
    let result = runtime.block_on(reverser_writer::Args::parse_and_run());
    runtime.shutdown_timeout(Duration::from_millis(500));
    Some(result)
}

/// The writer in its own process (the bench binary itself, started again with [`WRITER_CHILD`] set), release
/// build and flags as [`start_writer`], so that its RSS and CPU are its own.
pub struct WriterProcess {
    child: Child,
    pub pid: u32,
    pub grpc_url: String,
    pub admin: String,
    /// Kills the writer should the bench itself be killed.
    _orphan_watchdog: testkit::OrphanWatchdog,
}

impl WriterProcess {
    pub async fn start(work: &Path, log: &Path) -> anyhow::Result<WriterProcess> {
        let grpc = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .env(WRITER_CHILD, "1")
            .args(["--grpc-addr", &grpc, "--admin-addr", &admin])
            .arg("--work-dir")
            .arg(work)
            .args(["--git-batch-max-wait-sec", "1", "--leases", "off"])
            .env(
                "WRITER_LOG_LEVEL",
                std::env::var("WRITER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(log)?))
            .stderr(Stdio::from(std::fs::File::create(
                log.with_extension("err"),
            )?))
            .kill_on_drop(true)
            // Its own group, for the orphan watchdog.
            .process_group(0)
            .spawn()
            .context("starting the writer process")?;
        let pid = child.id().context("writer pid")?;
        let mut writer = WriterProcess {
            child,
            pid,
            grpc_url: format!("http://{grpc}"),
            admin,
            _orphan_watchdog: testkit::OrphanWatchdog::spawn(&[pid]),
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(&grpc).await.is_err() {
            if let Some(status) = writer.child.try_wait()? {
                bail!(
                    "the writer exited at start-up: {status}; see {}",
                    log.display()
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the writer did not listen within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(writer)
    }

    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
