//! The stream client's leader fencing and size limits against the real writer (in-process), pushing to a bare
//! repository: nothing goes out while the Lease is not provably current (a frozen process that thaws past its
//! deadline), a `StaleLeaderTerm` stops the client for good, and an object above the writer's announced limit is
//! skipped (reported, counted) while everything else flows.
#![allow(dead_code)]

use std::{path::Path, sync::Arc, time::Duration};

use clap::Parser;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use reverser_agent::{
    events::{AgentEvent, DestinationDecl, ObjectRef, ScopeRef},
    leader::Tenure,
    stream::{AgentIdentity, Feedback, LeaderFence, StreamClient, StreamConfig, StreamStats},
};
use reverser_writer::{Args, RunningWriter};
use testkit::BareRepo;

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

fn tenure(holder: &str, transitions: u64, valid_for: Duration, expired: bool) -> Tenure {
    Tenure {
        lease_uid: "lease-1".into(),
        transitions,
        holder: holder.into(),
        valid_until: if expired {
            Instant::now() - valid_for
        } else {
            Instant::now() + valid_for
        },
    }
}

fn fenced(
    writer: &RunningWriter,
    holder: &str,
    transitions: u64,
    expired: bool,
) -> (StreamConfig, watch::Sender<Option<Tenure>>) {
    let term = tenure(holder, transitions, Duration::from_secs(600), expired);
    let (tx, rx) = watch::channel(Some(term.clone()));
    let mut config = config(writer);
    config.identity.instance_id = holder.into();
    config.fence = Some(LeaderFence { term, tenure: rx });
    (config, tx)
}

#[tokio::test]
async fn nothing_is_sent_while_the_lease_is_not_provably_current() {
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &[]).await;
    // As after a freeze: the last renewal's deadline has passed on the monotonic clock.
    let (config, tenure) = fenced(&writer, "agent-a", 3, true);
    let mut client = Client::start(config, 16);
    client.send(declare(&repo.file_url())).await;
    client.send(upsert("a", "1")).await;
    client
        .expect("connected", |f| *f == Feedback::Connected)
        .await;
    // A while with nothing sent: no declaration, no upsert, no branch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.stats.sent(), 0);
    assert!(repo.rev_parse("main").is_none(), "nothing reached Git");
    // The elector renews the same term: sending resumes.
    tenure.send_replace(Some(tenure_renewed(&tenure)));
    client.acked(1).await;
    assert!(repo.read("main", &format!("c/{}", path("a"))).is_some());
    // Another term (or none) is not ours: nothing more goes out.
    tenure.send_replace(None);
    client.send(upsert("b", "1")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.stats.sent(), 1);
    assert!(repo.read("main", &format!("c/{}", path("b"))).is_none());
    client.shutdown().await;
    writer.stop().await.unwrap();
}

fn tenure_renewed(tenure: &watch::Sender<Option<Tenure>>) -> Tenure {
    let mut renewed = tenure.borrow().clone().expect("a tenure");
    renewed.valid_until = Instant::now() + Duration::from_secs(600);
    renewed
}

#[tokio::test]
async fn a_newer_term_stops_the_older_client_for_good() {
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &[]).await;
    let (config_a, _tenure_a) = fenced(&writer, "agent-a", 3, false);
    let mut a = Client::start(config_a, 16);
    a.send(declare(&repo.file_url())).await;
    a.send(upsert("a", "1")).await;
    a.acked(1).await;

    let (config_b, _tenure_b) = fenced(&writer, "agent-b", 4, false);
    let b = Client::start(config_b, 16);
    b.send(declare(&repo.file_url())).await;
    b.send(upsert("a", "2")).await;
    b.acked(1).await;
    a.expect("fenced", |f| matches!(f, Feedback::Fenced { .. }))
        .await;
    let sent = a.stats.sent();
    a.send(upsert("a", "stale")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.stats.sent(), sent, "a fenced client sends nothing more");
    assert!(
        repo.read("main", &format!("c/{}", path("a")))
            .unwrap()
            .contains("key: 2\n"),
        "the newer term's content stays"
    );
    a.shutdown().await;
    b.shutdown().await;
    writer.stop().await.unwrap();
}

#[tokio::test]
async fn an_object_above_the_writers_limit_is_skipped_and_the_rest_flows() {
    let repo = BareRepo::new();
    let work = tempfile::tempdir().unwrap();
    let writer = start_writer(work.path(), "127.0.0.1:0", &["--max-object-bytes", "1024"]).await;
    let mut client = Client::start(config(&writer), 16);
    client.send(declare(&repo.file_url())).await;
    client.send(begin(1)).await;
    client.send(upsert("small", "1")).await;
    client.send(upsert("huge", &"x".repeat(100 * 1024))).await;
    client.send(upsert("big", &"x".repeat(4 * 1024))).await;
    client.send(end(1)).await;
    client.send(upsert("after", "1")).await;
    let skipped = client
        .expect("objects skipped", |f| {
            matches!(f, Feedback::ObjectsSkipped { total: 2, .. })
        })
        .await;
    let Feedback::ObjectsSkipped { objects, .. } = skipped else {
        unreachable!()
    };
    assert!(objects.iter().any(|o| o.contains("ns/huge")), "{objects:?}");
    assert!(objects.iter().any(|o| o.contains("ns/big")), "{objects:?}");
    let stats = client.stats.clone();
    wait_until("the rest acked", || {
        stats.unacked() == 0 && stats.acked() >= 3
    })
    .await;
    assert_eq!(stats.objects_too_large(), 2);
    assert_eq!(stats.reconnects(), 0, "no reconnect loop");
    assert_eq!(
        stats.rejected(),
        0,
        "the writer never had to refuse anything"
    );
    for name in ["small", "after"] {
        assert!(
            repo.read("main", &format!("c/{}", path(name))).is_some(),
            "{name}"
        );
    }
    assert!(repo.read("main", &format!("c/{}", path("huge"))).is_none());
    client.shutdown().await;
    writer.stop().await.unwrap();
}
