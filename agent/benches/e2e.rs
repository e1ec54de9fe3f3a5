//! End-to-end benchmark of the agent: kube-emulator (in-process) → `reverser-agent` (the release
//! binary, a child process) → writer (in-process, real gRPC) → bare repository over `file://`,
//! compared in the same run with a writer-only seed of the same canonical YAML.
//!
//! ```text
//! cargo bench -p reverser-agent --bench e2e                        # BENCH_OBJECTS=10000
//! BENCH_OBJECTS=100000 cargo bench -p reverser-agent --bench e2e
//! ```
//!
//! Phases, each bounded by `BENCH_TIMEOUT_SEC` (default 240 s):
//!
//! 1. load N objects into the emulator (half ConfigMaps ~300 B, half Deployments ~2 KiB, over 100
//!    namespaces), the configbutler CRDs, a GitRepoConfig, a GitDestination and a
//!    ClusterWatchRule selecting configmaps and deployments cluster-wide;
//! 2. writer-only baseline: list the objects, render them with the agent's own canonical YAML and
//!    paths (not timed), then stream SnapshotBegin · Upsert×N · SnapshotEnd to a fresh writer over
//!    gRPC and time connect → the final Ack; then the same update load as in 5, straight to that
//!    writer (what the writer alone sustains);
//! 3. agent seed: start the agent against a second fresh writer and time its start → the pushed
//!    commit holding all N files (the bare repo's tip polled every 100 ms; files counted
//!    incrementally with `git diff-tree` between successive tips);
//! 4. agent VmRSS / VmHWM once it has settled (unacked 0, everything produced acked);
//! 5. `BENCH_UPDATE_RATE` (1000) ConfigMap updates/s for `BENCH_UPDATE_SECS` (10) through the
//!    emulator's API, sampling the agent's `gitops_reverser_agent_stream_unacked` every second,
//!    then the time until the last update is in the pushed tip. The unacked gauge is capped by
//!    `--max-unacked` (1000) by design, so "keeps up" is judged on the end-to-end rate
//!    (updates / (load + drain)) against the offered rate.
//!
//! Writers use the defaults except `--leases off` and `--git-batch-max-wait-sec 1`.
//!
//! **Scale scenario** (`BENCH_SCALE=1`): many namespaces, namespaced WatchRules in a share of them and a
//! ClusterWatchRule, the writer in its own process (its RSS is its own), no writer-only baseline:
//!
//! ```text
//! BENCH_SCALE=1 BENCH_OBJECTS=1000000 BENCH_NAMESPACES=10000 BENCH_RULE_SHARE=10 BENCH_UPDATE_SECS=60 \
//!   BENCH_TIMEOUT_SEC=3600 cargo bench -p reverser-agent --bench e2e
//! ```
//!
//! The corpus spread over `BENCH_NAMESPACES` namespaces (`ns-00`…); a WatchRule selecting ConfigMaps in every
//! namespace whose index is a multiple of `100 / BENCH_RULE_SHARE` (percent, default 10), all writing to one
//! GitDestination (whose access policy admits rules from all namespaces), and a ClusterWatchRule selecting every
//! Deployment. Reported: time from the agent's start to the pushed tree holding every selected object, agent and
//! writer peak RSS (VmHWM), the agent's watches (its `active_watches` gauge) and the API requests the emulator
//! counted from the agent's start to that pushed tree (by verb, resource and scope); then `BENCH_UPDATE_RATE`
//! updates/s of selected ConfigMaps for `BENCH_UPDATE_SECS`: max backlog, end-to-end rate, last push after the load.

mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use harness::*;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use kube_emulator::Emulator;
use reverser_agent::{canonical, paths};
use reverser_proto::v1::{
    self as pb, agent_message::Kind as In, writer_client::WriterClient, writer_message::Kind as Out,
};
use testkit::{BareRepo, corpus};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Settings {
    objects: usize,
    update_rate: usize,
    update_secs: usize,
    timeout: Duration,
}

fn main() -> anyhow::Result<()> {
    if let Some(result) = run_as_writer_child() {
        return result;
    }
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let settings = Settings {
        objects: env_num("BENCH_OBJECTS", 10_000).max(2),
        update_rate: env_num("BENCH_UPDATE_RATE", 1_000).max(100),
        update_secs: env_num("BENCH_UPDATE_SECS", 10).max(1),
        timeout: Duration::from_secs(env_num("BENCH_TIMEOUT_SEC", 240) as u64),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            if std::env::var_os("BENCH_SCALE").is_some() {
                run_scale(settings).await
            } else {
                run(settings).await
            }
        })
}

/// The agent's canonical YAML and paths for every mirrored object, read back from the emulator.
async fn canonical_corpus(client: &kube::Client) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for (group, kind, plural) in [
        ("", "ConfigMap", "configmaps"),
        ("apps", "Deployment", "deployments"),
    ] {
        let gvk = GroupVersionKind::gvk(group, "v1", kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let mut params = ListParams::default().limit(5000);
        loop {
            let list = api.list(&params).await?;
            for item in list.items {
                let mut value = serde_json::to_value(&item)?;
                value["apiVersion"] = ar.api_version.clone().into();
                value["kind"] = kind.into();
                let ns = item.metadata.namespace.as_deref();
                let name = item.metadata.name.as_deref().unwrap_or_default();
                let path = paths::object_path(group, "v1", plural, ns, name)?;
                out.push((path, canonical::to_canonical_yaml(&value)?.into_bytes()));
            }
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(out)
}

/// A direct `Writer.Sync` stream, playing an agent that already has the canonical YAML.
struct DirectStream {
    tx: mpsc::Sender<pb::AgentMessage>,
    replies: tonic::Streaming<pb::WriterMessage>,
    seq: u64,
    acks: usize,
    rejects: usize,
}

fn msg(kind: In) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

fn upsert(
    sequence: u64,
    path: String,
    content: Vec<u8>,
    operation: pb::Operation,
) -> pb::AgentMessage {
    msg(In::Upsert(pb::Upsert {
        sequence,
        destination: DEST.into(),
        path,
        content,
        object: None,
        operation: operation as i32,
        author: String::new(),
        event_time: None,
        fingerprint: String::new(),
    }))
}

impl DirectStream {
    /// Connects, says hello and declares the destination.
    async fn open(url: String, repo_url: String) -> anyhow::Result<DirectStream> {
        let channel = tonic::transport::Channel::from_shared(url)?
            .connect()
            .await?;
        let mut client = WriterClient::new(channel);
        let (tx, rx) = mpsc::channel(1024);
        tx.send(msg(In::Hello(pb::Hello {
            cluster_uid: "bench-writer-only".into(),
            cluster_name: "bench".into(),
            instance_id: "bench-0".into(),
            controller_namespace: "gitops-reverser".into(),
            controller_name: "gitops-reverser".into(),
            protocol_version: reverser_proto::PROTOCOL_VERSION,
            leader_term: None,
        })))
        .await?;
        let replies = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        tx.send(msg(In::Destination(pb::Destination {
            key: DEST.into(),
            repo_url,
            branch: BRANCH.into(),
            base_folder: BASE.into(),
            exclusive_mode: false,
            credentials: None,
            age_recipients: Vec::new(),
            ..Default::default()
        })))
        .await?;
        Ok(DirectStream {
            tx,
            replies,
            seq: 0,
            acks: 0,
            rejects: 0,
        })
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Reads replies until the Ack covering `sequence`.
    async fn wait_ack(&mut self, sequence: u64) -> anyhow::Result<()> {
        loop {
            let Some(reply) = self.replies.message().await? else {
                bail!("the writer ended the stream before the ack of {sequence}");
            };
            match reply.kind {
                Some(Out::Ack(a)) => {
                    self.acks += 1;
                    if a.sequence >= sequence {
                        return Ok(());
                    }
                }
                Some(Out::Reject(r)) => {
                    self.rejects += 1;
                    if self.rejects <= 3 {
                        eprintln!(
                            "writer-only: rejected {}: {} {}",
                            r.sequence, r.reason, r.message
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// One snapshot per resource, as the agent's seed sends it; sent from a task while this
    /// one reads acks. Returns the time from `started` to the Ack covering the last message.
    async fn seed(
        &mut self,
        corpus: Vec<(String, Vec<u8>)>,
        started: Instant,
    ) -> anyhow::Result<Duration> {
        let scope = |group: &str, resource: &str| pb::SnapshotScope {
            group: group.into(),
            version: "v1".into(),
            resource: resource.into(),
            namespace: String::new(),
        };
        let scopes = [scope("", "configmaps"), scope("apps", "deployments")];
        let mut messages = Vec::with_capacity(corpus.len() + 4);
        for s in &scopes {
            let sequence = self.next_seq();
            messages.push(msg(In::SnapshotBegin(pb::SnapshotBegin {
                sequence,
                destination: DEST.into(),
                scope: Some(s.clone()),
                epoch: 1,
            })));
        }
        for (path, content) in corpus {
            let sequence = self.next_seq();
            messages.push(upsert(sequence, path, content, pb::Operation::Create));
        }
        for s in &scopes {
            let sequence = self.next_seq();
            messages.push(msg(In::SnapshotEnd(pb::SnapshotEnd {
                sequence,
                destination: DEST.into(),
                scope: Some(s.clone()),
                epoch: 1,
            })));
        }
        let tx = self.tx.clone();
        let sender = tokio::spawn(async move {
            for m in messages {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        self.wait_ack(self.seq).await?;
        let elapsed = started.elapsed();
        sender.await?;
        Ok(elapsed)
    }
}

/// What a paced update load produced.
struct Paced {
    issued: usize,
    took: Duration,
    late_ticks: usize,
}

/// Calls `update(k)` `rate` times a second for `secs` seconds, in 10 ms ticks.
async fn paced<F, Fut>(rate: usize, secs: usize, mut update: F) -> anyhow::Result<Paced>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let per_tick = rate / 100;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut k, mut late_ticks) = (0, 0);
    for t in 0..secs * 100 {
        tick.tick().await;
        if started.elapsed() > Duration::from_millis(10 * t as u64 + 20) {
            late_ticks += 1;
        }
        for _ in 0..per_tick {
            update(k).await?;
            k += 1;
        }
    }
    Ok(Paced {
        issued: k,
        took: started.elapsed(),
        late_ticks,
    })
}

/// Path (relative to the base folder) and canonical YAML of the `k`-th update.
fn update_of(k: usize, configmaps: usize) -> anyhow::Result<(usize, String, String)> {
    let i = 2 * (k % configmaps);
    let doc = corpus::configmap(i, &format!("u{k}"));
    let canonical = canonical::to_canonical_yaml(&canonical::parse_yaml(&doc)?)?;
    let path = object_path(i)
        .strip_prefix(&format!("{BASE}/"))
        .map(str::to_owned)
        .context("object path under the base folder")?;
    Ok((i, path, canonical))
}

async fn run(s: Settings) -> anyhow::Result<()> {
    let n = s.objects;
    let configmaps = n.div_ceil(2);
    let uptime_start = uptime();
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_reverser-agent"));
    eprintln!("bench e2e: N={n}, agent binary {}", agent_bin.display());
    eprintln!("start: {uptime_start}");
    let mut rows = Vec::new();

    // 1. The cluster.
    let t = Instant::now();
    let emu = Emulator::start("127.0.0.1:0".parse()?).await?;
    emu.apply_dir(&testkit::manifest_dir().join("../crds"))
        .await?;
    let bytes = load_emulator(&emu, n).await?;
    let repo_agent = BareRepo::named("agent.git");
    let repo_writer = BareRepo::named("writer-only.git");
    emu.apply_yaml(&agent_config(&repo_agent.file_url()))
        .await?;
    let l = load1();
    rows.push(row(
        format!(
            "emulator load: {n} objects ({:.1} MiB manifests, {} namespaces)",
            bytes as f64 / 1048576.0,
            corpus::namespaces()
        ),
        secs(t.elapsed()),
        &l,
    ));
    eprintln!("loaded {} objects in {:?}", emu.object_count(), t.elapsed());

    // 2. Writer-only baseline: the same canonical YAML straight to a fresh writer.
    let client = emu.client().await;
    let corpus = canonical_corpus(&client).await?;
    if corpus.len() != n {
        bail!("listed {} objects, expected {n}", corpus.len());
    }
    let canonical_bytes: usize = corpus.iter().map(|(_, c)| c.len()).sum();
    let wo_dir = tempfile::tempdir()?;
    let writer = start_writer(wo_dir.path()).await?;
    let started = Instant::now();
    let mut direct = tokio::time::timeout(
        s.timeout,
        DirectStream::open(
            format!("http://{}", writer.grpc_addr),
            repo_writer.file_url(),
        ),
    )
    .await
    .context("connecting to the writer timed out")??;
    let wo_seed = tokio::time::timeout(s.timeout, direct.seed(corpus, started))
        .await
        .context("writer-only seed timed out")??;
    let l_wo = load1();
    let mut wo_counter = TipCounter::new(repo_writer.path());
    let wo_files = wo_counter.poll().await?;
    let wo_commits = commit_count(&repo_writer.path()).await;
    let mut wo_trees = Vec::new();
    for folder in MIRRORED {
        wo_trees.push(tree_id(&repo_writer.path(), folder).await);
    }
    eprintln!(
        "writer-only: {wo_seed:?} ({} acks, {} rejects, {wo_files} files, {wo_commits} commits)",
        direct.acks, direct.rejects
    );
    rows.push(row(
        format!(
            "writer-only seed: connect → final Ack ({wo_files} files, {wo_commits} commits, {:.1} MiB canonical YAML)",
            canonical_bytes as f64 / 1048576.0
        ),
        format!(
            "{} ({:.0} objects/s)",
            secs(wo_seed),
            n as f64 / wo_seed.as_secs_f64()
        ),
        &l_wo,
    ));
    if wo_files != n as i64 || direct.rejects > 0 {
        eprintln!(
            "WARNING: writer-only repo has {wo_files} files, {} rejects",
            direct.rejects
        );
    }

    // The same update load straight to the writer: what the writer alone sustains.
    let total = s.update_rate * s.update_secs;
    let updates = (0..total)
        .map(|k| update_of(k, configmaps).map(|(_, p, c)| (p, c)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let commits0 = wo_commits;
    let cpu0 = cpu_secs("self");
    let base_seq = direct.seq;
    let tx = direct.tx.clone();
    let wo_load = paced(s.update_rate, s.update_secs, |k| {
        let (path, content) = updates[k].clone();
        let m = upsert(
            base_seq + 1 + k as u64,
            path,
            content.into_bytes(),
            pb::Operation::Update,
        );
        let tx = tx.clone();
        async move { tx.send(m).await.context("writer stream closed") }
    })
    .await?;
    drop(tx);
    direct.seq += wo_load.issued as u64;
    let l_wo_upd = load1();
    let stopped = Instant::now();
    let last_seq = direct.seq;
    tokio::time::timeout(s.timeout, direct.wait_ack(last_seq))
        .await
        .context("writer-only updates were not acked in time")??;
    let wo_drain = stopped.elapsed();
    let wo_upd_cpu = cpu_secs("self") - cpu0;
    let wo_upd_commits = commit_count(&repo_writer.path()).await - commits0;
    let l_wo_drain = load1();
    rows.push(row(
        format!(
            "writer-only updates: {} sent in {} ({} ticks late by > 10 ms), {wo_upd_commits} commits, bench CPU {wo_upd_cpu:.1} s",
            wo_load.issued,
            secs(wo_load.took),
            wo_load.late_ticks
        ),
        format!(
            "{:.0}/s offered, {:.0}/s end to end",
            wo_load.issued as f64 / wo_load.took.as_secs_f64(),
            wo_load.issued as f64 / (wo_load.took + wo_drain).as_secs_f64()
        ),
        &l_wo_upd,
    ));
    rows.push(row(
        "writer-only updates: load stop → Ack of the last update",
        secs(wo_drain),
        &l_wo_drain,
    ));
    drop(direct);
    writer.stop().await?;

    // 3. The agent's seed.
    let w_dir = tempfile::tempdir()?;
    let writer = start_writer(w_dir.path()).await?;
    let writer_admin = writer.admin_addr.to_string();
    let kube_dir = tempfile::tempdir()?;
    let kubeconfig = kube_dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig_yaml(None))?;
    let self_cpu0 = cpu_secs("self");
    let started = Instant::now();
    let mut agent = Agent::start(
        &agent_bin,
        &format!("http://{}", writer.grpc_addr),
        &kubeconfig,
    )?;
    let pid = agent.pid;
    let mut peak_rss_seed: f64 = 0.0;
    let (seed, first_commit) = wait_for_seed(
        TipCounter::new(repo_agent.path()),
        n,
        started,
        s.timeout,
        &mut agent,
        || {
            if let Some((rss, _)) = rss_mib(pid) {
                peak_rss_seed = peak_rss_seed.max(rss);
            }
        },
    )
    .await?;
    let l_seed = load1();
    let agent_cpu_seed = cpu_secs(&pid.to_string());
    let self_cpu_seed = cpu_secs("self") - self_cpu0;
    let agent_commits = commit_count(&repo_agent.path()).await;
    eprintln!("agent seed: {seed:?} ({agent_commits} commits)");
    rows.push(row(
        format!("agent seed: start → pushed commit with all {n} files ({agent_commits} commits; first commit at {})",
            first_commit.map(secs).unwrap_or_default()),
        format!("{} ({:.0} objects/s)", secs(seed), n as f64 / seed.as_secs_f64()),
        &l_seed,
    ));
    let ratio = seed.as_secs_f64() / wo_seed.as_secs_f64();
    rows.push(judged(
        "agent seed / writer-only seed",
        format!("{ratio:.2}×"),
        "≤ 1.5×",
        ratio <= 1.5,
        &l_seed,
    ));
    rows.push(row(
        "CPU during the agent seed: agent process / bench process (emulator + writer)",
        format!("{agent_cpu_seed:.1} s / {self_cpu_seed:.1} s"),
        &l_seed,
    ));

    // 4. Memory at steady state.
    let settle = agent.settle(s.timeout).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, hwm) = rss_mib(pid).context("agent /proc status")?;
    let l_rss = load1();
    rows.push(judged(
        format!(
            "agent VmRSS at steady state (settled {} after the last file)",
            secs(settle)
        ),
        format!("{rss:.1} MiB"),
        "≤ 200 MB",
        rss * 1.048576 <= 200.0,
        &l_rss,
    ));
    rows.push(row(
        "agent VmHWM (peak RSS, seed included)",
        format!("{hwm:.1} MiB (sampled peak during seed {peak_rss_seed:.1} MiB)"),
        &l_rss,
    ));
    let mut same = true;
    for (folder, wo_tree) in MIRRORED.iter().zip(&wo_trees) {
        same &= tree_id(&repo_agent.path(), folder).await == *wo_tree;
    }
    rows.push(judged(
        "agent tree == writer-only tree (configmaps, deployments)",
        if same { "identical" } else { "different" },
        "identical",
        same,
        &l_rss,
    ));

    // 5. Sustained updates.
    let before = agent.metrics().await.unwrap_or_default();
    let upserts_before = metric(
        &before,
        "gitops_reverser_agent_events_total{kind=\"upsert\"}",
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let admin = agent.admin.clone();
        let writer_admin = writer_admin.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(f64, f64, f64, f64)> = Vec::new();
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let unacked = http_get(&admin, "/metrics")
                    .await
                    .map(|t| metric(&t, "gitops_reverser_agent_stream_unacked"))
                    .unwrap_or(f64::NAN);
                let queue = http_get(&writer_admin, "/metrics")
                    .await
                    .map(|t| metric_sum(&t, "gitops_reverser_repo_branch_queue_depth"))
                    .unwrap_or(f64::NAN);
                let rss = rss_mib(pid).map(|r| r.0).unwrap_or(f64::NAN);
                samples.push((t0.elapsed().as_secs_f64(), unacked, queue, rss));
            }
            samples
        })
    };
    let agent_cpu0 = cpu_secs(&pid.to_string());
    let self_cpu0 = cpu_secs("self");
    let commits0 = commit_count(&repo_agent.path()).await;
    let load = paced(s.update_rate, s.update_secs, |k| {
        let emu = emu.clone();
        let doc = corpus::configmap(2 * (k % configmaps), &format!("u{k}"));
        async move { emu.apply_yaml(&doc).await.map_err(anyhow::Error::from) }
    })
    .await?;
    let (k, load_time, late_ticks) = (load.issued, load.took, load.late_ticks);
    let l_upd = load1();
    let last = k - 1;
    let last_path = object_path(2 * (last % configmaps));
    let expect = format!("revision: u{last}\n");
    let stopped = Instant::now();
    let mut pushed_after = None;
    let mut drained_after = None;
    while stopped.elapsed() < s.timeout {
        if pushed_after.is_none() {
            let out = git(
                &repo_agent.path(),
                &["show", &format!("{BRANCH}:{last_path}")],
            )
            .await?;
            if String::from_utf8_lossy(&out.stdout).contains(&expect) {
                pushed_after = Some(stopped.elapsed());
            }
        }
        if pushed_after.is_some() && agent.unacked().await == Some(0.0) {
            drained_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = stop_tx.send(true);
    let samples = sampler.await?;
    let l_drain = load1();
    let after = agent.metrics().await.unwrap_or_default();
    let upserts = metric(
        &after,
        "gitops_reverser_agent_events_total{kind=\"upsert\"}",
    ) - upserts_before;
    let max = |f: fn(&(f64, f64, f64, f64)) -> f64| {
        samples
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    };
    let max_unacked = max(|s| s.1);
    let max_queue = max(|s| s.2);
    let max_rss = max(|s| s.3);
    let agent_upd_cpu = cpu_secs(&pid.to_string()) - agent_cpu0;
    let self_upd_cpu = cpu_secs("self") - self_cpu0;
    let upd_commits = commit_count(&repo_agent.path()).await - commits0;
    let offered = k as f64 / load_time.as_secs_f64();
    let end_to_end = pushed_after.map(|d| k as f64 / (load_time + d).as_secs_f64());
    rows.push(row(
        format!(
            "agent path updates: {k} applied to the emulator in {} ({late_ticks} ticks late by > 10 ms), {upd_commits} commits",
            secs(load_time)
        ),
        format!(
            "{offered:.0}/s offered, {} end to end",
            end_to_end.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "?".into())
        ),
        &l_upd,
    ));
    rows.push(row(
        "CPU during the update phase (load + drain): agent process / bench process (emulator + writer + driver)",
        format!("{agent_upd_cpu:.1} s / {self_upd_cpu:.1} s"),
        &l_drain,
    ));
    rows.push(row(
        "agent upserts produced during the update phase",
        format!("{upserts:.0}"),
        &l_drain,
    ));
    rows.push(judged(
        "max agent unacked backlog (gitops_reverser_agent_stream_unacked, 1 s samples, load + drain)",
        format!("{max_unacked:.0} (writer queue depth max {max_queue:.0})"),
        "≤ --max-unacked (1000)",
        max_unacked <= 1000.0,
        &l_upd,
    ));
    rows.push(row(
        "agent VmRSS max during updates",
        format!("{max_rss:.1} MiB"),
        &l_drain,
    ));
    let keeps_up = end_to_end.is_some_and(|r| r >= 0.9 * offered);
    rows.push(judged(
        "load stop → last update in the pushed tip",
        pushed_after
            .map(secs)
            .unwrap_or_else(|| "not within the timeout".into()),
        "keeps up: end-to-end ≥ 90% of offered",
        keeps_up,
        &l_drain,
    ));
    rows.push(row(
        "load stop → agent unacked 0",
        drained_after
            .map(secs)
            .unwrap_or_else(|| "not within the timeout".into()),
        &l_drain,
    ));

    agent.terminate().await;
    writer.stop().await?;
    emu.shutdown().await;
    let uptime_end = uptime();

    print_table(
        &format!("agent e2e bench, N = {n}"),
        &uptime_start,
        &uptime_end,
        &rows,
    );
    println!("\nbacklog samples (s since load start: unacked / writer queue / agent RSS MiB):");
    let line: Vec<String> = samples
        .iter()
        .map(|(t, u, q, r)| format!("{t:.0}: {u:.0}/{q:.0}/{r:.0}"))
        .collect();
    println!("{}", line.join(", "));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The scale scenario (`BENCH_SCALE=1`).

/// Every `step`-th namespace has a WatchRule for ConfigMaps.
fn rule_step() -> usize {
    let share = env_num("BENCH_RULE_SHARE", 10).clamp(1, 100);
    (100 / share).max(1)
}

/// Whether corpus object `i` is mirrored in the scale scenario: every Deployment (the ClusterWatchRule), and the
/// ConfigMaps of namespaces with a WatchRule.
fn scale_selected(i: usize) -> bool {
    !i.is_multiple_of(2) || corpus::namespace_index(i).is_multiple_of(rule_step())
}

/// The agent's configuration for the scale scenario: one destination, a ClusterWatchRule for Deployments, and a
/// WatchRule for ConfigMaps in every `rule_step()`-th namespace.
fn scale_config(repo_url: &str) -> String {
    let mut out = format!(
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
  accessPolicy: {{allowClusterRules: true, namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: GitDestination
metadata: {{name: prod, namespace: gitops-reverser}}
spec:
  repoRef: {{namespace: gitops-reverser, name: repo}}
  branch: {BRANCH}
  baseFolder: {BASE}
  accessPolicy: {{allowClusterRules: true, namespacedRules: {{mode: AllNamespaces}}}}
---
apiVersion: configbutler.ai/v1alpha1
kind: ClusterWatchRule
metadata: {{name: bench}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{scope: Namespaced, apiGroups: [apps], resources: [deployments]}}]
"
    );
    for ns in (0..corpus::namespaces()).step_by(rule_step()) {
        out.push_str(&format!(
            "---
apiVersion: configbutler.ai/v1alpha1
kind: WatchRule
metadata: {{name: configs, namespace: ns-{ns:02}}}
spec:
  destinationRef: {{name: prod, namespace: gitops-reverser}}
  rules: [{{apiGroups: [''], resources: [configmaps]}}]
"
        ));
    }
    out
}

/// Corpus index of the `k`-th update: a ConfigMap in a namespace with a WatchRule. ConfigMap `2j` lives in namespace
/// `j % namespaces`; with the namespace count a multiple of the step (checked at start), `j % step == 0` selects.
fn scale_update_index(k: usize, configmaps: usize) -> usize {
    let step = rule_step();
    let selectable = configmaps.div_ceil(step).max(1);
    2 * (step * (k % selectable))
}

/// `/proc` peaks of the agent and the writer.
#[derive(Default)]
struct Peaks {
    agent_rss: f64,
    writer_rss: f64,
}

impl Peaks {
    fn sample(&mut self, agent: u32, writer: u32) {
        if let Some((rss, _)) = rss_mib(agent) {
            self.agent_rss = self.agent_rss.max(rss);
        }
        if let Some((rss, _)) = rss_mib(writer) {
            self.writer_rss = self.writer_rss.max(rss);
        }
    }
}

/// The emulator's request counts, summed per verb, with lists and watches split by scope.
fn describe_requests(r: &kube_emulator::RequestCounts) -> String {
    let mut parts = vec![format!("{} in total", r.total)];
    for verb in ["list", "watch"] {
        let mut all = 0;
        let mut one = 0;
        for (k, n) in &r.by_kind {
            if k.verb == verb {
                if k.all_namespaces {
                    all += n;
                } else {
                    one += n;
                }
            }
        }
        parts.push(format!(
            "{verb}: {all} across all namespaces + {one} in one namespace or cluster-scoped"
        ));
    }
    for verb in ["get", "create", "update", "patch", "delete"] {
        let n = r.verb(verb);
        if n > 0 {
            parts.push(format!("{verb}: {n}"));
        }
    }
    parts.join(", ")
}

async fn run_scale(s: Settings) -> anyhow::Result<()> {
    let n = s.objects;
    let configmaps = n.div_ceil(2);
    let namespaces = corpus::namespaces();
    let step = rule_step();
    let rules = namespaces.div_ceil(step);
    if !namespaces.is_multiple_of(step) {
        bail!(
            "BENCH_NAMESPACES ({namespaces}) must be a multiple of 100 / BENCH_RULE_SHARE ({step})"
        );
    }
    let expected = (0..n).filter(|&i| scale_selected(i)).count();
    let uptime_start = uptime();
    let agent_bin = PathBuf::from(env!("CARGO_BIN_EXE_reverser-agent"));
    eprintln!(
        "bench e2e scale: N={n} in {namespaces} namespaces, WatchRules in every {step}th ({rules}), {expected} objects selected"
    );
    eprintln!("start: {uptime_start}");
    let mut rows = Vec::new();

    // 1. The cluster.
    let t = Instant::now();
    let emu = Emulator::start("127.0.0.1:0".parse()?).await?;
    emu.apply_dir(&testkit::manifest_dir().join("../crds"))
        .await?;
    let bytes = load_emulator(&emu, n).await?;
    let repo = BareRepo::named("agent.git");
    apply_yaml_chunked(&emu, &scale_config(&repo.file_url())).await?;
    let l = load1();
    let bench_rss = rss_mib(std::process::id()).map_or(0.0, |r| r.0);
    rows.push(row(
        format!(
            "emulator load: {n} objects ({:.1} MiB manifests) in {namespaces} namespaces, {rules} WatchRules + 1 ClusterWatchRule; bench process (emulator) RSS {bench_rss:.0} MiB",
            bytes as f64 / 1048576.0
        ),
        secs(t.elapsed()),
        &l,
    ));
    eprintln!("loaded {} objects in {:?}", emu.object_count(), t.elapsed());

    // 2. The seed: agent and writer, each its own process.
    let work = tempfile::tempdir()?;
    let writer =
        WriterProcess::start(&work.path().join("writer"), &work.path().join("writer.log")).await?;
    let kubeconfig = work.path().join("kubeconfig");
    std::fs::write(&kubeconfig, emu.kubeconfig_yaml(None))?;
    emu.reset_requests();
    let started = Instant::now();
    let mut agent = Agent::start(&agent_bin, &writer.grpc_url, &kubeconfig)?;
    let (pid, wpid) = (agent.pid, writer.pid);
    let mut peaks = Peaks::default();
    let (seed, first_commit) = wait_for_seed(
        TipCounter::new(repo.path()),
        expected,
        started,
        s.timeout,
        &mut agent,
        || peaks.sample(pid, wpid),
    )
    .await?;
    let requests = emu.requests();
    let l_seed = load1();
    let agent_cpu = cpu_secs(&pid.to_string());
    let writer_cpu = cpu_secs(&wpid.to_string());
    let commits = commit_count(&repo.path()).await;
    eprintln!("agent seed: {seed:?} ({commits} commits)");
    rows.push(row(
        format!(
            "agent start → pushed tree with all {expected} selected files ({commits} commits; first at {})",
            first_commit.map(secs).unwrap_or_default()
        ),
        format!("{} ({:.0} objects/s)", secs(seed), expected as f64 / seed.as_secs_f64()),
        &l_seed,
    ));
    rows.push(row(
        "CPU during the seed: agent / writer",
        format!("{agent_cpu:.1} s / {writer_cpu:.1} s"),
        &l_seed,
    ));
    let metrics = agent.metrics().await.unwrap_or_default();
    let watches = metric(&metrics, "gitops_reverser_agent_active_watches");
    rows.push(row(
        "watches the agent runs (active_watches)",
        format!("{watches:.0}"),
        &l_seed,
    ));
    rows.push(row(
        "API requests from the agent's start to the pushed tree (emulator's count)",
        describe_requests(&requests),
        &l_seed,
    ));
    for (kind, count) in &requests.by_kind {
        if kind.verb == "list" || kind.verb == "watch" {
            eprintln!(
                "  {} {} ({}): {count}",
                kind.verb,
                kind.resource,
                if kind.all_namespaces {
                    "all namespaces"
                } else {
                    "namespaced"
                }
            );
        }
    }

    let settle = agent.settle(s.timeout).await?;
    let (agent_rss, agent_hwm) = rss_mib(pid).context("agent /proc status")?;
    let (writer_rss, writer_hwm) = rss_mib(wpid).context("writer /proc status")?;
    let l_rss = load1();
    rows.push(judged(
        format!(
            "agent VmHWM after the seed (VmRSS {agent_rss:.0} MiB, settled {} after the last file; sampled peak {:.0} MiB)",
            secs(settle),
            peaks.agent_rss
        ),
        format!("{agent_hwm:.0} MiB"),
        "≤ 300 MB",
        agent_hwm * 1.048576 <= 300.0,
        &l_rss,
    ));
    rows.push(judged(
        format!(
            "writer VmHWM after the seed (VmRSS {writer_rss:.0} MiB; sampled peak {:.0} MiB)",
            peaks.writer_rss
        ),
        format!("{writer_hwm:.0} MiB"),
        "≤ 500 MB",
        writer_hwm * 1.048576 <= 500.0,
        &l_rss,
    ));

    // 3. Sustained updates of selected ConfigMaps.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let admin = agent.admin.clone();
        let writer_admin = writer.admin.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut samples: Vec<(f64, f64, f64, f64, f64)> = Vec::new();
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let unacked = http_get(&admin, "/metrics")
                    .await
                    .map(|t| metric(&t, "gitops_reverser_agent_stream_unacked"))
                    .unwrap_or(f64::NAN);
                let queue = http_get(&writer_admin, "/metrics")
                    .await
                    .map(|t| metric_sum(&t, "gitops_reverser_repo_branch_queue_depth"))
                    .unwrap_or(f64::NAN);
                let rss = rss_mib(pid).map(|r| r.0).unwrap_or(f64::NAN);
                let wrss = rss_mib(wpid).map(|r| r.0).unwrap_or(f64::NAN);
                samples.push((t0.elapsed().as_secs_f64(), unacked, queue, rss, wrss));
            }
            samples
        })
    };
    let commits0 = commit_count(&repo.path()).await;
    let load = paced(s.update_rate, s.update_secs, |k| {
        let emu = emu.clone();
        let doc = corpus::configmap(scale_update_index(k, configmaps), &format!("u{k}"));
        async move { emu.apply_yaml(&doc).await.map_err(anyhow::Error::from) }
    })
    .await?;
    let (k, load_time, late_ticks) = (load.issued, load.took, load.late_ticks);
    let l_upd = load1();
    let last = k - 1;
    let last_path = object_path(scale_update_index(last, configmaps));
    let expect = format!("revision: u{last}\n");
    let stopped = Instant::now();
    let mut pushed_after = None;
    while stopped.elapsed() < s.timeout {
        let out = git(&repo.path(), &["show", &format!("{BRANCH}:{last_path}")]).await?;
        if String::from_utf8_lossy(&out.stdout).contains(&expect) {
            pushed_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let _ = stop_tx.send(true);
    let samples = sampler.await?;
    let l_drain = load1();
    let max = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| {
        samples
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    };
    let upd_commits = commit_count(&repo.path()).await - commits0;
    let offered = k as f64 / load_time.as_secs_f64();
    let end_to_end = pushed_after.map(|d| k as f64 / (load_time + d).as_secs_f64());
    rows.push(row(
        format!(
            "updates: {k} ConfigMaps of ruled namespaces applied in {} ({late_ticks} ticks late by > 10 ms), {upd_commits} commits",
            secs(load_time)
        ),
        format!(
            "{offered:.0}/s offered, {} end to end",
            end_to_end.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "?".into())
        ),
        &l_upd,
    ));
    rows.push(judged(
        "max agent unacked backlog (1 s samples, load + drain)",
        format!(
            "{:.0} (writer queue depth max {:.0})",
            max(|s| s.1),
            max(|s| s.2)
        ),
        "≤ --max-unacked (1000)",
        max(|s| s.1) <= 1000.0,
        &l_upd,
    ));
    rows.push(judged(
        "load stop → last update in the pushed tip",
        pushed_after
            .map(secs)
            .unwrap_or_else(|| "not within the timeout".into()),
        "end-to-end ≥ 90% of offered",
        end_to_end.is_some_and(|r| r >= 0.9 * offered),
        &l_drain,
    ));
    let agent_hwm = rss_mib(pid).map_or(f64::NAN, |r| r.1);
    let writer_hwm = rss_mib(wpid).map_or(f64::NAN, |r| r.1);
    rows.push(row(
        "VmRSS max during updates / VmHWM at the end: agent, writer",
        format!(
            "agent {:.0} / {agent_hwm:.0} MiB, writer {:.0} / {writer_hwm:.0} MiB",
            max(|s| s.3),
            max(|s| s.4)
        ),
        &l_drain,
    ));

    let parts = |pid: u32| {
        rss_parts_mib(pid).map_or_else(
            || "?".to_owned(),
            |(anon, file)| format!("{anon:.0} / {file:.0} MiB"),
        )
    };
    rows.push(row(
        "resident at the end, anonymous (heap) / file-backed (mapped packs): agent, writer",
        format!("agent {}, writer {}", parts(pid), parts(wpid)),
        &l_drain,
    ));

    agent.terminate().await;
    writer.stop().await;
    emu.shutdown().await;
    let uptime_end = uptime();
    print_table(
        &format!("agent e2e scale bench, N = {n}, {namespaces} namespaces, {rules} WatchRules"),
        &uptime_start,
        &uptime_end,
        &rows,
    );
    println!(
        "\nbacklog samples (s since load start: unacked / writer queue / agent RSS / writer RSS MiB):"
    );
    let line: Vec<String> = samples
        .iter()
        .map(|(t, u, q, r, w)| format!("{t:.0}: {u:.0}/{q:.0}/{r:.0}/{w:.0}"))
        .collect();
    println!("{}", line.join(", "));
    Ok(())
}
