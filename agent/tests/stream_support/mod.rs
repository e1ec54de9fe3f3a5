//! The stream tests' shared harness (`stream_delivery`, `stream_fencing`): an in-process writer pushing to bare
//! repositories, a stream client driven by a bounded event channel, and the events a destination's tests send.
#![allow(dead_code)]

use std::{path::Path, sync::Arc, time::Duration};

use clap::Parser;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use reverser_agent::{
    events::{AgentEvent, DestinationDecl, Feedback, ObjectRef, ScopeRef},
    stream::{AgentIdentity, StreamClient, StreamConfig, StreamStats},
};
use reverser_writer::{Args, RunningWriter};

pub const DEST: &str = "gitops/prod";
/// Generous: a wait that runs out means something is stuck, not slow.
pub const WAIT: Duration = Duration::from_secs(60);

pub async fn start_writer(work_dir: &Path, grpc_addr: &str, extra: &[&str]) -> RunningWriter {
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

pub fn identity() -> AgentIdentity {
    AgentIdentity {
        cluster_uid: "uid-1".into(),
        cluster_name: "test".into(),
        instance_id: "agent-0".into(),
        controller_namespace: "gitops-reverser".into(),
        controller_name: "reverser".into(),
    }
}

pub fn config(writer: &RunningWriter) -> StreamConfig {
    let mut config = StreamConfig::new(format!("http://{}", writer.grpc_addr), identity());
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

pub fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: ns\ndata:\n  key: {value}\n"
    )
}

pub fn path(name: &str) -> String {
    format!("core/v1/configmaps/ns/{name}.yaml")
}

pub fn declare(repo_url: &str) -> AgentEvent {
    AgentEvent::Destination(DestinationDecl {
        key: DEST.into(),
        repo_url: repo_url.into(),
        branch: "main".into(),
        base_folder: "c".into(),
        exclusive_mode: false,
        credentials_reference: None,
        credentials: None,
        encryption: None,
        prune: Default::default(),
        commit_message: None,
        suspend: false,
        placement: Default::default(),
    })
}

pub fn upsert(name: &str, value: &str) -> AgentEvent {
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

pub fn delete(name: &str) -> AgentEvent {
    AgentEvent::Delete {
        destination: DEST.into(),
        path: path(name),
        object: ObjectRef::default(),
        author: None,
    }
}

pub fn scope() -> ScopeRef {
    ScopeRef {
        group: String::new(),
        version: "v1".into(),
        resource: "configmaps".into(),
        namespace: "ns".into(),
    }
}

pub fn begin(epoch: u64) -> AgentEvent {
    AgentEvent::SnapshotBegin {
        destination: DEST.into(),
        scope: scope(),
        epoch,
    }
}

pub fn end(epoch: u64) -> AgentEvent {
    AgentEvent::SnapshotEnd {
        destination: DEST.into(),
        scope: scope(),
        epoch,
    }
}

/// Polls `condition` until it holds; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A running stream client plus the test's ends of its channels.
pub struct Client {
    pub events: Option<mpsc::Sender<AgentEvent>>,
    pub feedback: mpsc::Receiver<Feedback>,
    /// Feedback received while waiting for something else.
    pub seen: Vec<Feedback>,
    pub stats: Arc<StreamStats>,
    pub task: JoinHandle<()>,
    pub stop: Option<oneshot::Sender<()>>,
}

impl Client {
    pub fn start(config: StreamConfig, events_capacity: usize) -> Client {
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

    pub fn sender(&self) -> mpsc::Sender<AgentEvent> {
        self.events.clone().expect("events still open")
    }

    pub async fn send(&self, event: AgentEvent) {
        self.sender().send(event).await.expect("client running");
    }

    /// Waits for feedback matching `predicate` (already seen or new).
    pub async fn expect(&mut self, what: &str, predicate: impl Fn(&Feedback) -> bool) -> Feedback {
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
    pub async fn acked(&self, n: u64) {
        let stats = self.stats.clone();
        wait_until(&format!("{n} acked messages"), || {
            stats.acked() >= n && stats.unacked() == 0
        })
        .await;
        assert_eq!(self.stats.acked(), n, "each message is acked exactly once");
    }

    /// Closes the events channel and waits for the client to finish (everything acked).
    pub async fn finish(mut self) -> Vec<Feedback> {
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

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().expect("not stopped yet").send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the client stops on shutdown")
            .expect("client task");
    }
}
