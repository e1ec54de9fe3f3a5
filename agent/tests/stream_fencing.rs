//! The stream client's leader fencing and size limits against the real writer (in-process), pushing to a bare
//! repository: nothing goes out while the Lease is not provably current (a frozen process that thaws past its
//! deadline), a `StaleLeaderTerm` stops the client for good, and an object above the writer's announced limit is
//! skipped (reported, counted) while everything else flows.
#![allow(dead_code)]

use std::time::Duration;

use tokio::{sync::watch, time::Instant};

use reverser_agent::events::Feedback;
use reverser_agent::stream::{LeaderFence, StreamConfig};
use reverser_common::lease::{LeaseState, Tenure};
use reverser_writer::RunningWriter;
use testkit::BareRepo;

mod stream_support;
use stream_support::*;

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
) -> (StreamConfig, watch::Sender<LeaseState>) {
    let term = tenure(holder, transitions, Duration::from_secs(600), expired);
    let (tx, rx) = watch::channel(held(term.clone()));
    let mut config = config(writer);
    config.identity.instance_id = holder.into();
    config.fence = Some(LeaderFence { term, lease: rx });
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
    tenure.send_replace(held(tenure_renewed(&tenure)));
    client.acked(1).await;
    assert!(repo.read("main", &format!("c/{}", path("a"))).is_some());
    // Another term (or none) is not ours: nothing more goes out.
    tenure.send_replace(LeaseState::default());
    client.send(upsert("b", "1")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.stats.sent(), 1);
    assert!(repo.read("main", &format!("c/{}", path("b"))).is_none());
    client.shutdown().await;
    writer.stop().await.unwrap();
}

fn held(tenure: Tenure) -> LeaseState {
    LeaseState {
        holder: tenure.holder.clone(),
        tenure: Some(tenure),
    }
}

fn tenure_renewed(lease: &watch::Sender<LeaseState>) -> Tenure {
    let mut renewed = lease.borrow().tenure.clone().expect("a tenure");
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
