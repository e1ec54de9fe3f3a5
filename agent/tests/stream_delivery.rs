//! The stream client against the real writer, in-process, pushing to real bare repositories (inspected with the
//! git CLI): delivery and acks, backpressure, a writer restart, rejects, and snapshot safety across reconnects.

use std::{path::Path, sync::Arc, time::Duration};

use clap::Parser;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use reverser_agent::{
    events::{AgentEvent, DestinationDecl, ObjectRef, ScopeRef},
    stream::{AgentIdentity, Feedback, Rejection, StreamClient, StreamConfig, StreamStats},
};
use reverser_proto::v1::{ListDestinationsRequest, writer_admin_client::WriterAdminClient};
use reverser_writer::{Args, RunningWriter};
use testkit::{BareRepo, free_port};

const DEST: &str = "gitops/prod";
/// Generous: a wait that runs out means something is stuck, not slow.
const WAIT: Duration = Duration::from_secs(60);

async fn start_writer(work_dir: &Path, grpc_addr: &str, extra: &[&str]) -> RunningWriter {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let work = work_dir.display().to_string();
    let mut argv = vec![
        "reverser-writer",
        "--grpc-addr",
        grpc_addr,
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--git-batch-max-wait-sec",
        "0.2",
        "--leases",
        "off",
    ];
    argv.extend_from_slice(extra);
    Args::try_parse_from(argv)
        .expect("valid flags")
        .start()
        .await
        .expect("writer starts")
}

fn identity() -> AgentIdentity {
    AgentIdentity {
        cluster_uid: "uid-1".into(),
        cluster_name: "test".into(),
        instance_id: "agent-0".into(),
        controller_namespace: "gitops-reverser".into(),
        controller_name: "reverser".into(),
    }
}

fn config(writer: &RunningWriter) -> StreamConfig {
    let mut config = StreamConfig::new(format!("http://{}", writer.grpc_addr), identity());
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: ns\ndata:\n  key: {value}\n"
    )
}

fn path(name: &str) -> String {
    format!("core/v1/configmaps/ns/{name}.yaml")
}

fn declare(repo_url: &str) -> AgentEvent {
    AgentEvent::Destination(DestinationDecl {
        key: DEST.into(),
        repo_url: repo_url.into(),
        branch: "main".into(),
        base_folder: "c".into(),
        exclusive_mode: false,
        credentials_reference: None,
        credentials: None,
        encryption: None,
    })
}

fn upsert(name: &str, value: &str) -> AgentEvent {
    AgentEvent::Upsert {
        destination: DEST.into(),
        path: path(name),
        yaml: configmap(name, value),
        object: ObjectRef {
            version: "v1".into(),
            resource: "configmaps".into(),
            namespace: "ns".into(),
            name: name.into(),
            ..ObjectRef::default()
        },
        created: true,
        author: None,
        fingerprint: None,
    }
}

fn delete(name: &str) -> AgentEvent {
    AgentEvent::Delete {
        destination: DEST.into(),
        path: path(name),
        object: ObjectRef::default(),
        author: None,
    }
}

fn scope() -> ScopeRef {
    ScopeRef {
        group: String::new(),
        version: "v1".into(),
        resource: "configmaps".into(),
        namespace: "ns".into(),
    }
}

fn begin(epoch: u64) -> AgentEvent {
    AgentEvent::SnapshotBegin {
        destination: DEST.into(),
        scope: scope(),
        epoch,
    }
}

fn end(epoch: u64) -> AgentEvent {
    AgentEvent::SnapshotEnd {
        destination: DEST.into(),
        scope: scope(),
        epoch,
    }
}

/// Polls `condition` until it holds; panics after [`WAIT`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A running stream client plus the test's ends of its channels.
struct Client {
    events: Option<mpsc::Sender<AgentEvent>>,
    feedback: mpsc::Receiver<Feedback>,
    /// Feedback received while waiting for something else.
    seen: Vec<Feedback>,
    stats: Arc<StreamStats>,
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl Client {
    fn start(config: StreamConfig, events_capacity: usize) -> Client {
        let client = StreamClient::new(config).expect("valid stream config");
        let stats = client.stats();
        let (events, events_rx) = mpsc::channel(events_capacity);
        let (feedback_tx, feedback) = mpsc::channel(64);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = client.spawn(events_rx, feedback_tx, async move {
            let _ = stopped.await;
        });
        Client {
            events: Some(events),
            feedback,
            seen: Vec::new(),
            stats,
            task,
            stop: Some(stop),
        }
    }

    fn sender(&self) -> mpsc::Sender<AgentEvent> {
        self.events.clone().expect("events still open")
    }

    async fn send(&self, event: AgentEvent) {
        self.sender().send(event).await.expect("client running");
    }

    /// Waits for feedback matching `predicate` (already seen or new).
    async fn expect(&mut self, what: &str, predicate: impl Fn(&Feedback) -> bool) -> Feedback {
        if let Some(index) = self.seen.iter().position(&predicate) {
            return self.seen.remove(index);
        }
        loop {
            let next = tokio::time::timeout(WAIT, self.feedback.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}; seen {:?}", self.seen))
                .unwrap_or_else(|| {
                    panic!("feedback closed waiting for {what}; seen {:?}", self.seen)
                });
            if predicate(&next) {
                return next;
            }
            self.seen.push(next);
        }
    }

    /// Waits until `n` messages were acked in total and none is outstanding.
    async fn acked(&self, n: u64) {
        let stats = self.stats.clone();
        wait_until(&format!("{n} acked messages"), || {
            stats.acked() >= n && stats.unacked() == 0
        })
        .await;
        assert_eq!(self.stats.acked(), n, "each message is acked exactly once");
    }

    /// Closes the events channel and waits for the client to finish (everything acked).
    async fn finish(mut self) -> Vec<Feedback> {
        self.events.take();
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the client finishes once everything is acked")
            .expect("client task");
        while let Ok(feedback) = self.feedback.try_recv() {
            self.seen.push(feedback);
        }
        self.seen
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().expect("not stopped yet").send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the client stops on shutdown")
            .expect("client task");
    }
}

async fn acked_sequence(writer: &RunningWriter) -> u64 {
    let mut admin = WriterAdminClient::connect(format!("http://{}", writer.grpc_addr))
        .await
        .expect("admin connects");
    let destinations = admin
        .list_destinations(ListDestinationsRequest {})
        .await
        .expect("listed")
        .into_inner()
        .destinations;
    destinations
        .iter()
        .find(|d| d.key == DEST)
        .expect("destination declared")
        .acked_sequence
}

#[tokio::test]
async fn events_flow_to_commits_and_the_backlog_drains_to_zero() {
    let repo = BareRepo::new();
    repo.commit_as_human(
        "main",
        &format!("c/{}", path("stale")),
        &configmap("stale", "x"),
        "human",
    );
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &[]).await;
    let mut client = Client::start(config(&writer), 16);

    client.send(declare(&repo.file_url())).await;
    for event in [
        begin(1),
        upsert("a", "1"),
        upsert("b", "1"),
        end(1),
        upsert("a", "2"),
        delete("b"),
    ] {
        client.send(event).await;
    }
    client
        .expect("connected", |f| *f == Feedback::Connected)
        .await;
    client
        .expect("destination accepted", |f| {
            matches!(f, Feedback::Status(s) if s.destination == DEST && s.condition_type == "Accepted" && s.status == "True")
        })
        .await;
    client.acked(6).await;

    assert_eq!(
        repo.read("main", &format!("c/{}", path("a"))),
        Some(configmap("a", "2"))
    );
    assert_eq!(
        repo.read("main", &format!("c/{}", path("b"))),
        None,
        "deleted"
    );
    assert_eq!(
        repo.read("main", &format!("c/{}", path("stale"))),
        None,
        "a complete snapshot deletes the orphan"
    );
    let stats = client.stats.clone();
    assert!(stats.sent() >= 6);
    assert_eq!((stats.rejected(), stats.reconnects()), (0, 0));
    assert!(stats.connected());
    let rest = client.finish().await;
    assert!(
        !rest.iter().any(|f| matches!(f, Feedback::Rejected(_))),
        "{rest:?}"
    );
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_backlog_stops_reading_events_and_loses_nothing_once_the_remote_appears() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("late.git");
    let url = format!("file://{}", remote.display());
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &[]).await;
    let mut config = config(&writer);
    config.max_unacked = 3;
    let mut client = Client::start(config, 2);

    let producer = {
        let events = client.sender();
        tokio::spawn(async move {
            events.send(declare(&url)).await.unwrap();
            for i in 0..10 {
                events
                    .send(upsert(&format!("cm{i}"), &i.to_string()))
                    .await
                    .unwrap();
            }
        })
    };
    // The writer cannot push, so nothing is acked: three messages outstanding, then the channel fills up.
    let (stats, events) = (client.stats.clone(), client.sender());
    wait_until("a full backlog and a full events channel", || {
        stats.unacked() == 3 && events.capacity() == 0
    })
    .await;
    drop(events);
    client
        .expect("push failing", |f| {
            matches!(f, Feedback::Status(s) if s.condition_type == "PushFailing" && s.status == "True")
        })
        .await;
    assert_eq!(
        client.stats.unacked(),
        3,
        "the backlog never grows past max_unacked"
    );
    assert_eq!(client.stats.acked(), 0);
    assert!(
        !producer.is_finished(),
        "ingestion waits instead of losing events"
    );

    // The remote appears; the writer's retry pushes, acks free the backlog and the rest flows.
    testkit::git(None, &["init", "--bare", "-q", remote.to_str().unwrap()]);
    tokio::time::timeout(WAIT, producer)
        .await
        .expect("the producer gets through")
        .unwrap();
    client.acked(10).await;
    for i in 0..10 {
        let shown = testkit::git(
            Some(&remote),
            &["show", &format!("main:c/{}", path(&format!("cm{i}")))],
        );
        assert_eq!(
            String::from_utf8(shown.stdout).unwrap(),
            configmap(&format!("cm{i}"), &i.to_string()),
            "cm{i} landed"
        );
    }
    client.finish().await;
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn a_writer_restart_mid_stream_lands_every_event_exactly_once_with_increasing_sequences() {
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    // One change per flush: many commits, so a duplicate would show.
    let flags = ["--git-batch-max-files", "1"];
    let writer = start_writer(work.path(), &addr, &flags).await;
    let mut client = Client::start(config(&writer), 4);

    client.send(declare(&repo.file_url())).await;
    for i in 1..=5 {
        client.send(upsert(&format!("p{i}"), &i.to_string())).await;
    }
    client.acked(5).await;
    assert_eq!(acked_sequence(&writer).await, 5);

    // The remote goes away: the writer receives p6..p10 but cannot push them, so they stay unacked.
    let aside = repo.root().join("aside.git");
    std::fs::rename(repo.path(), &aside).unwrap();
    for i in 6..=10 {
        client.send(upsert(&format!("p{i}"), &i.to_string())).await;
    }
    client
        .expect("push failing", |f| {
            matches!(f, Feedback::Status(s) if s.condition_type == "PushFailing" && s.status == "True")
        })
        .await;
    let stats = client.stats.clone();
    wait_until("p6..p10 sent", || stats.sent() >= 10).await;
    assert_eq!(stats.unacked(), 5);

    // More events keep coming while the writer restarts on the same address and work dir (its buffer is lost;
    // the remote is back for the new one).
    let producer = {
        let events = client.sender();
        tokio::spawn(async move {
            for i in 11..=20 {
                events
                    .send(upsert(&format!("p{i}"), &i.to_string()))
                    .await
                    .unwrap();
            }
        })
    };
    writer.stop().await.unwrap();
    std::fs::rename(&aside, repo.path()).unwrap();
    let writer = start_writer(work.path(), &addr, &flags).await;

    tokio::time::timeout(WAIT, producer)
        .await
        .expect("producer done")
        .unwrap();
    client.acked(20).await;
    client
        .expect("reconnected", |f| *f == Feedback::Reconnected)
        .await;
    assert!(client.stats.reconnects() >= 1);
    assert!(
        client.stats.sent() >= 25,
        "p6..p10 went out twice: {}",
        client.stats.sent()
    );

    // A re-sent identical object is a no-op; a delete is one more commit.
    client.send(upsert("p1", "1")).await;
    client.send(delete("p2")).await;
    client.acked(22).await;

    for i in (1..=20).filter(|i| *i != 2) {
        assert_eq!(
            repo.read("main", &format!("c/{}", path(&format!("p{i}")))),
            Some(configmap(&format!("p{i}"), &i.to_string())),
            "p{i}"
        );
    }
    assert_eq!(repo.read("main", &format!("c/{}", path("p2"))), None);
    // Whatever the batching (the stopped writer's worker may still push its buffer once the remote is back),
    // every object was committed exactly once: re-sent copies were no-ops.
    for i in 1..=20 {
        let file = format!("c/{}", path(&format!("p{i}")));
        let touched = testkit::git(
            Some(&repo.path()),
            &["rev-list", "--count", "main", "--", &file],
        );
        let expected = if i == 2 { "2" } else { "1" };
        assert_eq!(
            String::from_utf8_lossy(&touched.stdout).trim(),
            expected,
            "commits touching p{i}: {:?}",
            repo.log_subjects("main")
        );
    }
    assert_eq!(
        acked_sequence(&writer).await,
        22,
        "numbering went on across the restart: the 22nd message carried sequence 22"
    );
    let rest = client.finish().await;
    assert!(
        !rest.iter().any(|f| matches!(f, Feedback::Rejected(_))),
        "{rest:?}"
    );
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn a_reject_is_reported_as_feedback_and_does_not_block_later_events() {
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &[]).await;
    let mut client = Client::start(config(&writer), 16);

    client.send(declare(&repo.file_url())).await;
    let mut invalid = upsert("bad", "1");
    if let AgentEvent::Upsert { path, .. } = &mut invalid {
        *path = "core/v1/configmaps/ns/bad.txt".into();
    }
    client.send(invalid).await;
    client.send(upsert("good", "1")).await;

    let rejected = client
        .expect("the reject", |f| matches!(f, Feedback::Rejected(_)))
        .await;
    let Feedback::Rejected(Rejection {
        destination,
        sequence,
        reason,
        ..
    }) = rejected
    else {
        unreachable!()
    };
    assert_eq!(
        (destination.as_str(), sequence, reason.as_str()),
        (DEST, 1, "InvalidPath")
    );
    client.acked(1).await;
    assert_eq!(client.stats.rejected(), 1);
    assert_eq!(
        repo.read("main", &format!("c/{}", path("good"))),
        Some(configmap("good", "1"))
    );
    assert!(repo.ls_tree("main").iter().all(|p| !p.ends_with("bad.txt")));
    client.finish().await;
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn an_epoch_begun_before_a_reconnect_deletes_nothing_and_a_fresh_epoch_after_it_does() {
    let repo = BareRepo::new();
    let orphan = format!("c/{}", path("orphan"));
    repo.commit_as_human("main", &orphan, &configmap("orphan", "x"), "human");
    let work = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let writer = start_writer(work.path(), &addr, &[]).await;
    let mut client = Client::start(config(&writer), 16);

    client.send(declare(&repo.file_url())).await;
    client.send(begin(1)).await;
    client.send(upsert("a", "1")).await;
    client.acked(2).await;

    // The rest of epoch 1 is produced while the writer is away: its end must not close a snapshot whose
    // begin (and first upserts) the next connection never carries.
    writer.stop().await.unwrap();
    client.send(upsert("b", "1")).await;
    client.send(end(1)).await;
    let writer = start_writer(work.path(), &addr, &[]).await;

    let abandoned = client
        .expect("the abandoned end", |f| {
            matches!(f, Feedback::SnapshotAbandoned { .. })
        })
        .await;
    assert_eq!(
        abandoned,
        Feedback::SnapshotAbandoned {
            destination: DEST.into(),
            scope: scope(),
            epoch: 1
        }
    );
    client
        .expect("reconnected", |f| *f == Feedback::Reconnected)
        .await;
    client.acked(3).await;
    assert_eq!(client.stats.snapshots_abandoned(), 1);
    assert!(
        repo.read("main", &orphan).is_some(),
        "nothing deleted on an incomplete snapshot"
    );
    assert!(repo.read("main", &format!("c/{}", path("b"))).is_some());

    // Ingestion re-lists after the reconnect: a whole epoch on one connection deletes the orphan.
    for event in [begin(2), upsert("a", "1"), upsert("b", "1"), end(2)] {
        client.send(event).await;
    }
    client.acked(7).await;
    assert_eq!(
        repo.read("main", &orphan),
        None,
        "the fresh snapshot deletes the orphan"
    );
    assert!(repo.read("main", &format!("c/{}", path("a"))).is_some());
    assert!(repo.read("main", &format!("c/{}", path("b"))).is_some());
    let rest = client.finish().await;
    assert!(
        !rest.iter().any(|f| matches!(f, Feedback::Rejected(_))),
        "{rest:?}"
    );
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_the_client_while_the_writer_is_unreachable() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut config = StreamConfig::new(format!("http://{addr}"), identity());
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    let mut client = Client::start(config, 4);
    client.send(upsert("a", "1")).await;
    let Feedback::Disconnected { error } = client
        .expect("disconnected", |f| {
            matches!(f, Feedback::Disconnected { .. })
        })
        .await
    else {
        unreachable!()
    };
    assert!(!error.is_empty());
    assert_eq!(client.stats.unacked(), 1, "kept for a later connection");
    assert!(!client.stats.connected());
    client.shutdown().await;
}
