//! Leader-term fencing and message limits at the writer, with scripted agents over real gRPC:
//!
//! - a newer leader term cuts off the streams of an older one, refuses what they still send (a thawed leader's
//!   send buffer) and refuses their reconnects, also after a writer restart (the term is persisted);
//! - `Welcome` announces the limits; a hostile client sending a message above the decoding limit gets a Reject
//!   `ObjectTooLarge` and a RESOURCE_EXHAUSTED status, the writer logs it at WARN, and other streams go on.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use reverser_proto::v1::{self as pb, agent_message::Kind as In, writer_message::Kind as Out};
use support::{Agent, Writer, configmap, hello, upsert};
use testkit::BareRepo;

/// Every log line of this test binary (the writer runs in-process).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .init();
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        std::io::stderr().write_all(bytes)?;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn hello_in_term(cluster_uid: &str, instance: &str, transitions: u64) -> pb::AgentMessage {
    let mut message = hello(cluster_uid);
    if let Some(In::Hello(hello)) = &mut message.kind {
        hello.instance_id = instance.into();
        hello.leader_term = Some(pb::LeaderTerm {
            lease_uid: "lease-uid-1".into(),
            transitions,
            holder: format!("{instance}-holder"),
        });
    }
    message
}

async fn connect_in_term(writer: &Writer, instance: &str, transitions: u64) -> Agent {
    let mut agent = Agent::connect_raw(&writer.grpc_url(), "cluster-1").await;
    agent
        .send(hello_in_term("cluster-1", instance, transitions))
        .await;
    agent
}

/// The next reply that is not an ack or status, and how the stream ended.
async fn refusal(agent: &mut Agent) -> (Vec<pb::Reject>, Option<tonic::Status>) {
    let mut rejects = Vec::new();
    loop {
        match agent.next().await {
            Some(Ok(Out::Reject(reject))) => rejects.push(reject),
            Some(Ok(_)) => {}
            Some(Err(status)) => return (rejects, Some(status)),
            None => return (rejects, None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_leader_term_cuts_off_the_older_one_for_good_even_after_a_writer_restart() {
    logs();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = Writer::start(&[]).await;

    let mut old = connect_in_term(&writer, "agent-a", 4).await;
    old.expect(|m| matches!(m, Out::Welcome(_)), "welcome")
        .await;
    old.declare("ns/prod", &url, "main", "clusters/prod").await;
    old.send(upsert(
        "ns/prod",
        1,
        "cm/a.yaml",
        &configmap("shop", "a", "old-1"),
    ))
    .await;
    old.ack("ns/prod", 1).await;
    let first = repo.tip_message("main");
    assert!(
        first.contains("X-ConfigButler-LeaderTerm: 4/agent-a-holder"),
        "the commit names its leader term: {first}"
    );

    // The successor says Hello: the old stream is refused and ended at once.
    let mut new = connect_in_term(&writer, "agent-b", 5).await;
    new.expect(|m| matches!(m, Out::Welcome(_)), "welcome")
        .await;
    let (rejects, status) = refusal(&mut old).await;
    assert!(
        rejects.iter().any(|r| r.reason == "StaleLeaderTerm"),
        "{rejects:?}"
    );
    let status = status.expect("the old stream ends with an error");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");

    // What the old leader still had in its send buffer never lands, whatever the new leader does.
    new.declare("ns/prod", &url, "main", "clusters/prod").await;
    new.send(upsert(
        "ns/prod",
        1,
        "cm/a.yaml",
        &configmap("shop", "a", "new-1"),
    ))
    .await;
    new.ack("ns/prod", 1).await;
    let mut late = connect_in_term(&writer, "agent-a", 4).await;
    let (rejects, _) = refusal(&mut late).await;
    assert_eq!(
        rejects.first().map(|r| r.reason.as_str()),
        Some("StaleLeaderTerm"),
        "a reconnect in the old term is refused: {rejects:?}"
    );
    // A second holder claiming the current term is refused too.
    let mut usurper = Agent::connect_raw(&writer.grpc_url(), "cluster-1").await;
    let mut claim = hello_in_term("cluster-1", "agent-c", 5);
    if let Some(In::Hello(h)) = &mut claim.kind {
        h.leader_term.as_mut().unwrap().holder = "agent-c-holder".into();
    }
    usurper.send(claim).await;
    let (rejects, _) = refusal(&mut usurper).await;
    assert_eq!(
        rejects.first().map(|r| r.reason.as_str()),
        Some("StaleLeaderTerm"),
        "{rejects:?}"
    );
    // Another cluster is not affected by cluster-1's terms.
    let mut other = Agent::connect_raw(&writer.grpc_url(), "cluster-2").await;
    other.send(hello_in_term("cluster-2", "agent-a", 0)).await;
    other
        .expect(
            |m| matches!(m, Out::Welcome(_)),
            "welcome of another cluster",
        )
        .await;
    drop((new, other));

    // A restarted writer still knows term 5: the old leader connecting first is refused.
    let work_dir = writer.stop().await;
    let writer = Writer::start_in(work_dir, &[]).await;
    let mut old_again = connect_in_term(&writer, "agent-a", 4).await;
    let (rejects, _) = refusal(&mut old_again).await;
    assert_eq!(
        rejects.first().map(|r| r.reason.as_str()),
        Some("StaleLeaderTerm"),
        "after a restart: {rejects:?}"
    );
    let mut new_again = connect_in_term(&writer, "agent-b", 5).await;
    new_again
        .expect(
            |m| matches!(m, Out::Welcome(_)),
            "welcome of the current term",
        )
        .await;
    assert!(
        repo.read("main", "clusters/prod/cm/a.yaml")
            .unwrap()
            .contains("new-1"),
        "the successor's content stays"
    );
    drop(new_again);
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_gets_a_clear_status_and_other_streams_go_on() {
    logs();
    let repo = BareRepo::new();
    let url = repo.file_url();
    let writer = Writer::start(&["--max-object-bytes", "1024"]).await;

    let mut calm = Agent::connect_raw(&writer.grpc_url(), "calm").await;
    calm.send(hello("calm")).await;
    let welcome = match calm
        .expect(|m| matches!(m, Out::Welcome(_)), "welcome")
        .await
    {
        Out::Welcome(welcome) => welcome,
        _ => unreachable!(),
    };
    assert_eq!(welcome.max_object_bytes, 1024);
    assert_eq!(welcome.max_message_bytes, 1024 + 64 * 1024);
    calm.declare("ns/calm", &url, "main", "clusters/calm").await;

    let mut hostile = writer.agent("hostile").await;
    hostile
        .declare("ns/hostile", &url, "main", "clusters/hostile")
        .await;
    // Above the object limit but within the message limit: a Reject for that message, the stream goes on.
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\n  namespace: shop\ndata:\n  key: {}\n",
        "x".repeat(4096)
    );
    hostile
        .send(upsert("ns/hostile", 1, "cm/big.yaml", &big))
        .await;
    assert_eq!(hostile.reject(1).await.reason, "ObjectTooLarge");
    // Above the message limit: the writer cannot read it; it says so and ends the stream.
    let huge = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: huge\n  namespace: shop\ndata:\n  key: {}\n",
        "x".repeat(200 * 1024)
    );
    hostile
        .send(upsert("ns/hostile", 2, "cm/huge.yaml", &huge))
        .await;
    let (rejects, status) = refusal(&mut hostile).await;
    assert!(
        rejects
            .iter()
            .any(|r| r.reason == "ObjectTooLarge" && r.message.contains("max_message_bytes")),
        "{rejects:?}"
    );
    let status = status.expect("the stream ends with an error status, not OK");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("limit"), "{status}");
    let logs = log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("oversize message")),
        "a WARN log line names the oversize message"
    );

    // The other stream is untouched.
    calm.send(upsert(
        "ns/calm",
        1,
        "cm/a.yaml",
        &configmap("shop", "a", "1"),
    ))
    .await;
    calm.ack("ns/calm", 1).await;
    assert!(repo.read("main", "clusters/calm/cm/a.yaml").is_some());
    assert!(repo.read("main", "clusters/hostile/cm/big.yaml").is_none());
    let metrics = writer.metrics().await;
    assert!(
        metrics.contains("gitops_reverser_messages_rejected_total{reason=\"ObjectTooLarge\"} 2"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop((calm, hostile));
    writer.stop().await;
}
