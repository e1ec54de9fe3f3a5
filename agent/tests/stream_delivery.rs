//! The stream client against the real writer, in-process, pushing to real bare repositories (inspected with the
//! git CLI): delivery and acks, backpressure, a writer restart, rejects, and snapshot safety across reconnects.

use std::time::Duration;

use reverser_agent::{
    events::{AgentEvent, Feedback, Rejection},
    stream::StreamConfig,
};
use reverser_proto::v1::{ListDestinationsRequest, writer_admin_client::WriterAdminClient};
use reverser_writer::RunningWriter;
use testkit::{BareRepo, free_port};

mod stream_support;
use stream_support::*;

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
