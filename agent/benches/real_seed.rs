//! The agent's seed against the real control plane (etcd + kube-apiserver v1.37.2, [`testkit::RealCluster`]),
//! compared in the same run with a plain paginated LIST of the same objects and with the same seed against the
//! emulator.
//!
//! ```text
//! cargo bench -p reverser-agent --bench real_seed                                    # 100,000 objects
//! REVERSER_BENCH_OBJECTS=10000 cargo bench -p reverser-agent --bench real_seed       # a quick run
//! ```
//!
//! 1. a real control plane without kube-controller-manager (50,000 Deployments would otherwise get ReplicaSets
//!    and Pods: the benchmark measures the agent, not the controllers), etcd with an 8 GiB quota, compaction every
//!    5 minutes; the configbutler CRDs, 100 namespaces;
//! 2. bulk load: N corpus objects (half ConfigMaps ~300 B, half Deployments ~2 KiB; `testkit::corpus`) created
//!    through the API with `REVERSER_BENCH_LOAD_CONCURRENCY` (32) requests in flight;
//! 3. the floor: a plain paginated LIST (limit=500, every page, JSON decoded) of ConfigMaps then Deployments,
//!    twice; the faster one is the floor (target: agent seed ≤ 2× floor);
//! 4. the agent seed: the release agent binary and the writer (this bench binary started again as the writer,
//!    release build, so that its RSS is its own) with a fresh bare repository; timed from the agent's start to the
//!    pushed commit holding all N files. Peak RSS of the agent, the writer, kube-apiserver and etcd sampled every
//!    100 ms; the agent's per-type list times from its log (`list complete`);
//! 5. the real control plane is stopped, and 1–4 run again against the emulator (in this process).
//!
//! Each phase is bounded by `BENCH_TIMEOUT_SEC` (default 900 s). The agent's log is kept when
//! `REVERSER_BENCH_KEEP_LOGS` is set (its path is printed).

mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use harness::*;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{GroupVersionKind, ObjectList};
use kube::discovery::ApiResource;
use kube_emulator::Emulator;
use reverser_agent::canonical;
use testkit::{BareRepo, RealCluster, corpus};

struct Settings {
    objects: usize,
    concurrency: usize,
    timeout: Duration,
}

fn main() -> anyhow::Result<()> {
    if let Some(result) = run_as_writer_child() {
        return result;
    }
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let settings = Settings {
        objects: env_num("REVERSER_BENCH_OBJECTS", 100_000).max(2),
        concurrency: env_num("REVERSER_BENCH_LOAD_CONCURRENCY", 32).max(1),
        timeout: Duration::from_secs(env_num("BENCH_TIMEOUT_SEC", 900) as u64),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(settings))
}

/// The two mirrored types: (group, kind, plural).
const TYPES: [(&str, &str, &str); 2] = [
    ("", "ConfigMap", "configmaps"),
    ("apps", "Deployment", "deployments"),
];

fn api_resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let yaml = std::fs::read_to_string(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&yaml)?,
        &Default::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Creates corpus objects `0..n` through the API, `concurrency` at a time; retries what the server refuses for
/// a moment (429, 5xx, a dropped connection). Returns the manifests' bytes.
async fn bulk_load(client: &kube::Client, n: usize, concurrency: usize) -> anyhow::Result<usize> {
    let bytes: usize = (0..n).map(|i| corpus_manifest(i).len()).sum();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let done = &done;
            async move {
                let (group, kind, plural) = TYPES[i % 2];
                let value = canonical::parse_yaml(&corpus_manifest(i))?;
                let object: DynamicObject = serde_json::from_value(value)?;
                let api: Api<DynamicObject> = Api::namespaced_with(
                    client,
                    &corpus::namespace(i),
                    &api_resource(group, kind, plural),
                );
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match api.create(&PostParams::default(), &object).await {
                        Ok(_) => break,
                        // A retried create that had gone through.
                        Err(kube::Error::Api(e)) if e.code == 409 && attempt > 1 => break,
                        Err(kube::Error::Api(e)) if e.code < 429 || attempt >= 10 => {
                            bail!("creating object {i}: {e}")
                        }
                        Err(e) if attempt >= 10 => bail!("creating object {i}: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
                    }
                }
                let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if k.is_multiple_of(10_000) {
                    eprintln!(
                        "  loaded {k}/{n} ({:.0}/s)",
                        k as f64 / started.elapsed().as_secs_f64()
                    );
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(bytes)
}

/// What one paginated LIST of every mirrored object took.
struct Listed {
    took: Duration,
    objects: usize,
    bytes: usize,
    pages: usize,
}

/// A plain paginated LIST (limit=500, every page, decoded as kube-rs decodes it) of both types, one after the
/// other.
async fn list_all(client: &kube::Client) -> anyhow::Result<Listed> {
    let started = Instant::now();
    let (mut objects, mut bytes, mut pages) = (0, 0, 0);
    for (group, _, plural) in TYPES {
        let url = if group.is_empty() {
            format!("/api/v1/{plural}")
        } else {
            format!("/apis/{group}/v1/{plural}")
        };
        let mut params = ListParams::default().limit(500);
        loop {
            let request = kube::core::Request::new(&url)
                .list(&params)
                .context("list request")?;
            let text = client.request_text(request).await?;
            bytes += text.len();
            pages += 1;
            let list: ObjectList<DynamicObject> = serde_json::from_str(&text)?;
            objects += list.items.len();
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(Listed {
        took: started.elapsed(),
        objects,
        bytes,
        pages,
    })
}

/// Peak RSS (MiB) per process name, sampled.
#[derive(Default)]
struct Peaks(Vec<(String, f64)>);

impl Peaks {
    fn note(&mut self, name: &str, mib: f64) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some((_, peak)) => *peak = peak.max(mib),
            None => self.0.push((name.to_owned(), mib)),
        }
    }

    fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0.0)
    }
}

/// The agent's `list complete` log lines, condensed: `core/v1/configmaps 50000 objects in 4.1 s (streaming)`.
fn list_times(log: &Path) -> Vec<String> {
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    text.lines()
        .filter(|l| l.contains("list complete"))
        .map(|l| {
            let field = |key: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")))
                    .unwrap_or("?")
                    .trim_matches('"')
                    .to_owned()
            };
            let ms: f64 = field("elapsed_ms").parse().unwrap_or(f64::NAN);
            let streaming = if field("streaming") == "true" {
                "streaming list"
            } else {
                "paged list"
            };
            format!(
                "{} {} objects in {:.2} s ({streaming})",
                field("watch"),
                field("objects"),
                ms / 1000.0
            )
        })
        .collect()
}

/// One agent seed: writer process + agent against `kubeconfig`, until all `n` files are pushed.
struct Seed {
    took: Duration,
    first_commit: Option<Duration>,
    commits: usize,
    agent_cpu: f64,
    writer_cpu: f64,
    peaks: Peaks,
    agent_steady_mib: f64,
    agent_hwm_mib: f64,
    writer_hwm_mib: f64,
    list_times: Vec<String>,
}

async fn seed(
    label: &str,
    n: usize,
    kubeconfig: &Path,
    repo: &BareRepo,
    timeout: Duration,
    mut sample_cluster: impl FnMut(&mut Peaks),
) -> anyhow::Result<Seed> {
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_reverser-agent"));
    let work = tempfile::Builder::new()
        .prefix(&format!("bench-{label}-"))
        .tempdir()?;
    let writer =
        WriterProcess::start(&work.path().join("writer"), &work.path().join("writer.log")).await?;
    let agent_log = work.path().join("agent.log");
    let started = Instant::now();
    let mut agent = Agent::start_logging(
        &agent_bin,
        &writer.grpc_url,
        kubeconfig,
        Some(&agent_log),
        "info",
    )?;
    let (agent_pid, writer_pid) = (agent.pid, writer.pid);
    let mut peaks = Peaks::default();
    // The corpus's files only: a real cluster has ConfigMaps of its own (kube-system).
    let counter = TipCounter::new(repo.path()).only(|path| path.contains("/ns-"));
    let result = wait_for_seed(counter, n, started, timeout, &mut agent, || {
        if let Some((rss, _)) = rss_mib(agent_pid) {
            peaks.note("agent", rss);
        }
        if let Some((rss, _)) = rss_mib(writer_pid) {
            peaks.note("writer", rss);
        }
        sample_cluster(&mut peaks);
    })
    .await;
    let (took, first_commit) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "{label}: the seed failed; the agent's log ends with:\n{}",
                tail(&agent_log, 30)
            );
            agent.terminate().await;
            writer.stop().await;
            return Err(e);
        }
    };
    let agent_cpu = cpu_secs(&agent_pid.to_string());
    let writer_cpu = cpu_secs(&writer_pid.to_string());
    let commits = commit_count(&repo.path()).await;
    agent.settle(timeout).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (agent_steady_mib, agent_hwm_mib) = rss_mib(agent_pid).context("agent /proc status")?;
    let (_, writer_hwm_mib) = rss_mib(writer_pid).context("writer /proc status")?;
    agent.terminate().await;
    writer.stop().await;
    if std::env::var_os("REVERSER_BENCH_KEEP_LOGS").is_some() {
        let kept = work.keep();
        eprintln!("{label}: logs kept in {}", kept.display());
    }
    Ok(Seed {
        took,
        first_commit,
        commits,
        agent_cpu,
        writer_cpu,
        peaks,
        agent_steady_mib,
        agent_hwm_mib,
        writer_hwm_mib,
        list_times: list_times(&agent_log),
    })
}

/// The text without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn rate(n: usize, d: Duration) -> String {
    format!("{} ({:.0} objects/s)", secs(d), n as f64 / d.as_secs_f64())
}

/// The rows of one backend's seed, judged against its LIST floor.
fn seed_rows(
    rows: &mut Vec<Row>,
    backend: &str,
    n: usize,
    seed: &Seed,
    floor: &Listed,
    load: &str,
) {
    rows.push(row(
        format!(
            "{backend}: agent seed, start → pushed commit with all {n} files ({} commits, first at {})",
            seed.commits,
            seed.first_commit.map(secs).unwrap_or_default()
        ),
        rate(n, seed.took),
        load,
    ));
    let ratio = seed.took.as_secs_f64() / floor.took.as_secs_f64();
    rows.push(judged(
        format!("{backend}: agent seed / plain LIST"),
        format!("{ratio:.2}×"),
        "≤ 2×",
        ratio <= 2.0,
        load,
    ));
    rows.push(row(
        format!("{backend}: CPU during the seed, agent / writer"),
        format!("{:.1} s / {:.1} s", seed.agent_cpu, seed.writer_cpu),
        load,
    ));
    rows.push(row(
        format!("{backend}: agent peak RSS (VmHWM; sampled peak; after settling)"),
        format!(
            "{:.1} MiB; {:.1} MiB; {:.1} MiB",
            seed.agent_hwm_mib,
            seed.peaks.get("agent"),
            seed.agent_steady_mib
        ),
        load,
    ));
    rows.push(row(
        format!("{backend}: writer peak RSS (VmHWM; sampled peak)"),
        format!(
            "{:.1} MiB; {:.1} MiB",
            seed.writer_hwm_mib,
            seed.peaks.get("writer")
        ),
        load,
    ));
    for line in &seed.list_times {
        rows.push(row(format!("{backend}: agent list: {line}"), "", load));
    }
}

fn list_row(rows: &mut Vec<Row>, backend: &str, what: &str, listed: &Listed, load: &str) {
    rows.push(row(
        format!(
            "{backend}: {what}: plain paginated LIST, limit=500 ({} objects, {} pages, {:.1} MiB JSON)",
            listed.objects,
            listed.pages,
            listed.bytes as f64 / 1048576.0
        ),
        rate(listed.objects, listed.took),
        load,
    ));
}

async fn run(s: Settings) -> anyhow::Result<()> {
    let n = s.objects;
    let uptime_start = uptime();
    eprintln!("bench real_seed: N={n}; {uptime_start}");
    let crds = testkit::manifest_dir().join("../crds");
    let mut rows = Vec::new();

    // 1.–2. The real control plane, loaded.
    let cluster = RealCluster::builder()
        .without_controller_manager()
        .compaction_interval(Duration::from_secs(300))
        .etcd_arg("--quota-backend-bytes=8589934592")
        .start()
        .await;
    cluster.apply_dir(&crds);
    cluster.apply_yaml(&namespaces_yaml());
    let client = client_from(cluster.kubeconfig()).await?;
    let t = Instant::now();
    let bytes = tokio::time::timeout(s.timeout, bulk_load(&client, n, s.concurrency))
        .await
        .context("the bulk load timed out")??;
    let l = load1();
    rows.push(row(
        format!(
            "real: bulk load, {n} creates, {} in flight ({:.1} MiB manifests, {} namespaces)",
            s.concurrency,
            bytes as f64 / 1048576.0,
            corpus::namespaces()
        ),
        rate(n, t.elapsed()),
        &l,
    ));
    let cluster_rss = |peaks: &mut Peaks| {
        for (name, kib) in cluster.rss_kib() {
            peaks.note(name, kib as f64 / 1024.0);
        }
    };
    let mut after_load = Peaks::default();
    cluster_rss(&mut after_load);

    // 3. The floor.
    let mut floors = Vec::new();
    for attempt in ["first", "second"] {
        let listed = tokio::time::timeout(s.timeout, list_all(&client))
            .await
            .context("the LIST timed out")??;
        // The corpus and the cluster's own few (kube-system ConfigMaps).
        if listed.objects < n {
            bail!("the LIST found {} objects, expected {n}", listed.objects);
        }
        list_row(&mut rows, "real", attempt, &listed, &load1());
        floors.push(listed);
    }
    let floor = floors
        .into_iter()
        .min_by_key(|l| l.took)
        .context("a LIST ran")?;

    // 4. The agent's seed.
    let repo = BareRepo::named("real-seed.git");
    cluster.apply_yaml(&agent_config(&repo.file_url()));
    let real = seed(
        "real",
        n,
        cluster.kubeconfig(),
        &repo,
        s.timeout,
        cluster_rss,
    )
    .await?;
    let l = load1();
    seed_rows(&mut rows, "real", n, &real, &floor, &l);
    rows.push(row(
        "real: kube-apiserver / etcd RSS after the load; peak during the seed",
        format!(
            "{:.0} / {:.0} MiB; {:.0} / {:.0} MiB",
            after_load.get("kube-apiserver"),
            after_load.get("etcd"),
            real.peaks.get("kube-apiserver"),
            real.peaks.get("etcd")
        ),
        &l,
    ));
    drop(client);
    drop(cluster);

    // 5. The same against the emulator.
    let t = Instant::now();
    let emu = Emulator::start("127.0.0.1:0".parse()?).await?;
    emu.apply_dir(&crds).await?;
    load_emulator(&emu, n).await?;
    rows.push(row(
        format!("emulator: load {n} objects (apply, chunks of 1000)"),
        rate(n, t.elapsed()),
        &load1(),
    ));
    let emu_client = emu.client().await;
    let emu_list = list_all(&emu_client).await?;
    list_row(&mut rows, "emulator", "first", &emu_list, &load1());
    let repo = BareRepo::named("emulator-seed.git");
    emu.apply_yaml(&agent_config(&repo.file_url())).await?;
    let kube_dir = tempfile::tempdir()?;
    let kubeconfig = kube_dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig_yaml(None))?;
    let self_pid = std::process::id();
    let on_emulator = seed("emulator", n, &kubeconfig, &repo, s.timeout, |peaks| {
        if let Some((rss, _)) = rss_mib(self_pid) {
            peaks.note("emulator", rss);
        }
    })
    .await?;
    let l = load1();
    seed_rows(&mut rows, "emulator", n, &on_emulator, &emu_list, &l);
    rows.push(row(
        "real seed / emulator seed",
        format!(
            "{:.2}×",
            real.took.as_secs_f64() / on_emulator.took.as_secs_f64()
        ),
        &l,
    ));
    rows.push(row(
        "emulator (this process) peak RSS during the seed",
        format!("{:.0} MiB", on_emulator.peaks.get("emulator")),
        &l,
    ));
    emu.shutdown().await;

    print_table(
        &format!("agent seed on the real API server, N = {n}"),
        &uptime_start,
        &uptime(),
        &rows,
    );
    Ok(())
}
