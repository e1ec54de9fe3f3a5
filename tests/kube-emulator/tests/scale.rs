//! Scale measurements (ignored by default; they print figures, they do not assert timings):
//! 100,000 ConfigMaps stored, LIST of all of them, and 1,000 watch events/s sustained.
//!
//! `cargo test --release -p kube-emulator --test scale -- --ignored --nocapture`

mod common;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn configmap(i: usize) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": format!("cm-{i:06}"), "labels": {"app": "scale", "shard": (i % 10).to_string()}},
        "data": {"key": "value", "index": i.to_string()}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored"]
async fn scale_100k_configmaps_list_and_watch_throughput() {
    const N: usize = 100_000;
    let emu = common::emulator().await;
    let client = emu.client().await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let rss_before = rss_mib();

    let started = Instant::now();
    futures::stream::iter(0..N)
        .map(|i| {
            let cms = cms.clone();
            async move {
                cms.create(&PostParams::default(), &configmap(i))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
        .unwrap();
    let create = started.elapsed();
    println!(
        "created {N} ConfigMaps over HTTP in {:.1}s ({:.0}/s); RSS {:.0} MiB -> {:.0} MiB",
        create.as_secs_f64(),
        N as f64 / create.as_secs_f64(),
        rss_before,
        rss_mib()
    );
    assert_eq!(emu.object_count(), N + 4);

    let started = Instant::now();
    let all = cms.list(&ListParams::default()).await.unwrap();
    println!(
        "LIST of {} ConfigMaps in one response: {:.2}s",
        all.items.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(all.items.len(), N);
    drop(all);

    let started = Instant::now();
    let raw = common::get(emu.addr(), "/api/v1/namespaces/default/configmaps").await;
    println!(
        "raw LIST body: {:.1} MiB in {:.2}s",
        raw.body.len() as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let mut pages = 0;
    let mut items = 0;
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = cms.list(&lp).await.unwrap();
        pages += 1;
        items += page.items.len();
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    println!(
        "paginated LIST (limit=500): {items} items in {pages} pages, {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(items, N);

    let started = Instant::now();
    let selected = cms
        .list(&ListParams::default().labels("shard=3"))
        .await
        .unwrap();
    println!(
        "LIST with labelSelector over {N}: {} items in {:.2}s",
        selected.items.len(),
        started.elapsed().as_secs_f64()
    );

    // Sustained watch load: 1,000 updates/s for 10 s while a watch follows.
    const RATE: usize = 1_000;
    const SECONDS: usize = 10;
    let rv = emu.resource_version().to_string();
    let mut stream = cms
        .watch(&WatchParams::default().timeout(290), &rv)
        .await
        .unwrap()
        .boxed();
    let writer = {
        let cms = cms.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = RATE / 100;
            let mut sent = 0usize;
            let started = Instant::now();
            let mut max_behind = Duration::ZERO;
            for t in 0..SECONDS * 100 {
                tick.tick().await;
                let batch = futures::stream::iter(0..per_tick)
                    .map(|k| {
                        let cms = cms.clone();
                        let i = (t * per_tick + k) % N;
                        async move {
                            let patch = json!({"data": {"tick": t.to_string()}});
                            cms.patch(
                                &format!("cm-{i:06}"),
                                &kube::api::PatchParams::default(),
                                &kube::api::Patch::Merge(patch),
                            )
                            .await
                            .map(|_| ())
                        }
                    })
                    .buffer_unordered(per_tick)
                    .try_collect::<()>();
                batch.await.unwrap();
                sent += per_tick;
                let planned = Duration::from_millis(10 * (t as u64 + 1));
                max_behind = max_behind.max(started.elapsed().saturating_sub(planned));
            }
            (sent, started.elapsed(), max_behind)
        })
    };
    let started = Instant::now();
    let mut received = 0usize;
    while received < RATE * SECONDS {
        match stream.try_next().await.unwrap().expect("watch continues") {
            WatchEvent::Modified(_) => received += 1,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
            _ => {}
        }
    }
    let watch_elapsed = started.elapsed();
    let (sent, write_elapsed, max_behind) = writer.await.unwrap();
    println!(
        "watch: {sent} updates written in {:.2}s ({:.0}/s, writer at most {} ms behind schedule); {received} events received in {:.2}s ({:.0}/s)",
        write_elapsed.as_secs_f64(),
        sent as f64 / write_elapsed.as_secs_f64(),
        max_behind.as_millis(),
        watch_elapsed.as_secs_f64(),
        received as f64 / watch_elapsed.as_secs_f64(),
    );
    assert_eq!(received, sent);
    println!(
        "RSS at end: {:.0} MiB (emulator and client in one process)",
        rss_mib()
    );
}
