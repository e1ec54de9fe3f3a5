//! Shared harness for the writer's end-to-end tests: an in-process writer on ephemeral ports and a scripted
//! agent speaking the real gRPC protocol.
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use reverser_proto::v1::{
    self as pb, agent_message::Kind as In, writer_client::WriterClient, writer_message::Kind as Out,
};
use reverser_writer::{Args, RunningWriter};

pub const WAIT: Duration = Duration::from_secs(30);

/// A writer running in this process.
pub struct Writer {
    pub running: Option<RunningWriter>,
    pub work_dir: tempfile::TempDir,
}

impl Writer {
    /// Starts a writer with short batch waits and leases off, plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Writer {
        let work_dir = tempfile::tempdir().unwrap();
        Self::start_in(work_dir, extra).await
    }

    pub async fn start_in(work_dir: tempfile::TempDir, extra: &[&str]) -> Writer {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let work = work_dir.path().display().to_string();
        let mut argv = vec![
            "reverser-writer",
            "--grpc-addr",
            "127.0.0.1:0",
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
        let args = Args::try_parse_from(argv).expect("valid flags");
        let running = args.start().await.expect("writer starts");
        Writer {
            running: Some(running),
            work_dir,
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.running.as_ref().unwrap().grpc_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.running.as_ref().unwrap().admin_addr)
    }

    pub async fn agent(&self, cluster_uid: &str) -> Agent {
        Agent::connect(&self.grpc_url(), cluster_uid).await
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("{}/metrics", self.admin_url())).await
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        self.running.take().unwrap().stop().await.unwrap();
        self.work_dir
    }
}

/// The body of a plain HTTP GET of `url` (the admin endpoint); panics when the connection fails.
pub async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    testkit::http_get(host, &path)
        .await
        .unwrap_or_else(|| panic!("GET {url} failed"))
}

/// A scripted agent: one `Writer.Sync` stream.
pub struct Agent {
    pub cluster_uid: String,
    sender: Option<mpsc::Sender<pb::AgentMessage>>,
    replies: tonic::Streaming<pb::WriterMessage>,
    /// Replies seen while waiting for something else.
    pub seen: Vec<Out>,
}

pub fn hello(cluster_uid: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::Hello(pb::Hello {
            cluster_uid: cluster_uid.into(),
            cluster_name: format!("cluster-{cluster_uid}"),
            instance_id: "agent-0".into(),
            controller_namespace: "gitops-reverser".into(),
            controller_name: "reverser".into(),
            protocol_version: 1,
            leader_term: None,
        })),
    }
}

pub fn destination(
    key: &str,
    repo_url: &str,
    branch: &str,
    base_folder: &str,
    exclusive: bool,
) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::Destination(pb::Destination {
            key: key.into(),
            repo_url: repo_url.into(),
            branch: branch.into(),
            base_folder: base_folder.into(),
            exclusive_mode: exclusive,
            credentials: None,
            age_recipients: Vec::new(),
            ..Default::default()
        })),
    }
}

pub fn upsert(dest: &str, sequence: u64, path: &str, yaml: &str) -> pb::AgentMessage {
    upsert_by(dest, sequence, path, yaml, "")
}

pub fn upsert_by(
    dest: &str,
    sequence: u64,
    path: &str,
    yaml: &str,
    author: &str,
) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::Upsert(pb::Upsert {
            sequence,
            destination: dest.into(),
            path: path.into(),
            content: yaml.as_bytes().to_vec(),
            object: None,
            operation: pb::Operation::Update as i32,
            author: author.into(),
            event_time: None,
            fingerprint: String::new(),
        })),
    }
}

pub fn delete(dest: &str, sequence: u64, path: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::Delete(pb::Delete {
            sequence,
            destination: dest.into(),
            path: path.into(),
            object: None,
            author: String::new(),
            event_time: None,
        })),
    }
}

pub fn scope(group: &str, version: &str, resource: &str, namespace: &str) -> pb::SnapshotScope {
    pb::SnapshotScope {
        group: group.into(),
        version: version.into(),
        resource: resource.into(),
        namespace: namespace.into(),
    }
}

pub fn snapshot_begin(
    dest: &str,
    sequence: u64,
    scope: pb::SnapshotScope,
    epoch: u64,
) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::SnapshotBegin(pb::SnapshotBegin {
            sequence,
            destination: dest.into(),
            scope: Some(scope),
            epoch,
        })),
    }
}

pub fn snapshot_end(
    dest: &str,
    sequence: u64,
    scope: pb::SnapshotScope,
    epoch: u64,
) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::SnapshotEnd(pb::SnapshotEnd {
            sequence,
            destination: dest.into(),
            scope: Some(scope),
            epoch,
        })),
    }
}

/// A ConfigMap's canonical YAML.
pub fn configmap(namespace: &str, name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\ndata:\n  key: {value}\n"
    )
}

impl Agent {
    /// Connects without sending anything.
    pub async fn connect_raw(url: &str, cluster_uid: &str) -> Agent {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connect to writer");
        Self::over(channel, cluster_uid).await
    }

    pub async fn over(channel: Channel, cluster_uid: &str) -> Agent {
        let mut client = WriterClient::new(channel);
        let (sender, receiver) = mpsc::channel(4096);
        let replies = client
            .sync(ReceiverStream::new(receiver))
            .await
            .expect("open Sync")
            .into_inner();
        Agent {
            cluster_uid: cluster_uid.into(),
            sender: Some(sender),
            replies,
            seen: Vec::new(),
        }
    }

    /// Connects and says hello (waits for the Welcome).
    pub async fn connect(url: &str, cluster_uid: &str) -> Agent {
        let mut agent = Self::connect_raw(url, cluster_uid).await;
        agent.send(hello(cluster_uid)).await;
        agent
            .expect(|m| matches!(m, Out::Welcome(_)), "welcome")
            .await;
        agent
    }

    pub async fn send(&mut self, message: pb::AgentMessage) {
        self.sender
            .as_ref()
            .expect("still sending")
            .send(message)
            .await
            .expect("stream open");
    }

    /// A second handle on the stream's sending side (for a task that sends while the test reads elsewhere).
    pub fn sender(&self) -> mpsc::Sender<pb::AgentMessage> {
        self.sender.clone().expect("still sending")
    }

    /// Half-closes the stream (the writer then flushes and finishes the stream).
    pub fn finish(&mut self) {
        self.sender.take();
    }

    pub async fn declare(&mut self, key: &str, repo_url: &str, branch: &str, base_folder: &str) {
        self.send(destination(key, repo_url, branch, base_folder, false))
            .await;
        self.expect(
            |m| matches!(m, Out::DestinationStatus(s) if s.destination == key && s.r#type == "Accepted"),
            "destination accepted",
        )
        .await;
    }

    /// Next reply, or None when the stream ended.
    pub async fn next(&mut self) -> Option<Result<Out, tonic::Status>> {
        match tokio::time::timeout(WAIT, self.replies.message())
            .await
            .expect("a reply within the wait")
        {
            Ok(Some(message)) => Some(Ok(message.kind.expect("reply kind"))),
            Ok(None) => None,
            Err(status) => Some(Err(status)),
        }
    }

    /// Waits for a reply matching `predicate` (already seen or new) and returns it.
    pub async fn expect(&mut self, predicate: impl Fn(&Out) -> bool, what: &str) -> Out {
        if let Some(index) = self.seen.iter().position(&predicate) {
            return self.seen.remove(index);
        }
        loop {
            match self.next().await {
                Some(Ok(message)) if predicate(&message) => return message,
                Some(Ok(message)) => self.seen.push(message),
                Some(Err(status)) => panic!(
                    "stream failed while waiting for {what}: {status}; seen {:?}",
                    self.seen
                ),
                None => panic!(
                    "stream ended while waiting for {what}; seen {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits until `dest` is acked at `sequence` or later; returns the commit SHA.
    pub async fn ack(&mut self, dest: &str, sequence: u64) -> String {
        match self
            .expect(
                |m| matches!(m, Out::Ack(a) if a.destination == dest && a.sequence >= sequence),
                "ack",
            )
            .await
        {
            Out::Ack(ack) => ack.commit_sha,
            _ => unreachable!(),
        }
    }

    pub async fn reject(&mut self, sequence: u64) -> pb::Reject {
        match self
            .expect(
                |m| matches!(m, Out::Reject(r) if r.sequence == sequence),
                "reject",
            )
            .await
        {
            Out::Reject(reject) => reject,
            _ => unreachable!(),
        }
    }

    /// Declares each stalled destination `(key, url)` with one change at `path`, then a healthy file:// destination
    /// whose change must be acked meanwhile (a stalled remote holds back nothing else); returns that repository.
    pub async fn declare_stalled_beside_a_healthy_one(
        &mut self,
        stalled: &[(&str, String)],
        path: &str,
    ) -> testkit::BareRepo {
        for (dest, url) in stalled {
            self.declare(dest, url, "main", "c").await;
            self.send(upsert(dest, 1, path, &configmap("ns", "a", "1")))
                .await;
        }
        let good = testkit::BareRepo::new();
        self.declare("gitops/good", &good.file_url(), "main", "c")
            .await;
        self.send(upsert("gitops/good", 1, path, &configmap("ns", "a", "1")))
            .await;
        self.ack("gitops/good", 1).await;
        assert!(good.read("main", &format!("c/{path}")).is_some());
        good
    }

    /// Waits (at most a minute) until each destination reports `PushFailing=True` with `RemoteUnreachable`.
    pub async fn expect_remote_unreachable(&mut self, stalled: &[(&str, String)]) {
        for (dest, _) in stalled {
            let failing =
                tokio::time::timeout(Duration::from_secs(60), self.status(dest, "PushFailing"))
                    .await
                    .unwrap_or_else(|_| panic!("{dest}: no PushFailing within a minute"));
            assert_eq!(failing.status, "True");
            assert_eq!(failing.reason, "RemoteUnreachable", "{failing:?}");
        }
    }

    pub async fn status(&mut self, dest: &str, kind: &str) -> pb::DestinationStatus {
        match self
            .expect(|m| matches!(m, Out::DestinationStatus(s) if s.destination == dest && s.r#type == kind), kind)
            .await
        {
            Out::DestinationStatus(status) => status,
            _ => unreachable!(),
        }
    }

    /// Replies that arrive within `window` (for "nothing else happened" checks).
    pub async fn drain_for(&mut self, window: Duration) -> Vec<Out> {
        let mut out = std::mem::take(&mut self.seen);
        while let Ok(Ok(Some(message))) = tokio::time::timeout(window, self.replies.message()).await
        {
            out.push(message.kind.expect("reply kind"));
        }
        out
    }
}

/// Path of a tool installed by `scripts/install-test-deps.sh` or found on PATH; panics with the install hint.
pub fn tool(name: &str) -> PathBuf {
    let local = testkit::manifest_dir().join("../.tools/bin").join(name);
    if local.exists() {
        return local;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    }) {
        return found;
    }
    panic!(
        "{name} is not installed: run scripts/install-test-deps.sh (the README's test command does)"
    );
}
