//! CommitRequests over the real protocol (`FlushDestination` → `FlushResult`), read back with the git CLI: the
//! destination's pending changes are committed at once, authored by the requester with the requester's message
//! (the trailers stay); nothing pending makes no commit; malformed messages are refused.

mod support;

use reverser_proto::v1::{self as pb, agent_message::Kind as In, writer_message::Kind as Out};
use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";
/// Far longer than any test: only a flush can make these commits.
const LONG_WINDOW: &[&str] = &["--git-batch-max-wait-sec", "3600"];

fn flush(dest: &str, sequence: u64, message: &str, author: &str, uid: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(In::Flush(pb::FlushDestination {
            sequence,
            destination: dest.into(),
            message: message.into(),
            author: author.into(),
            request_name: format!("gitops/{uid}"),
            request_uid: uid.into(),
        })),
    }
}

async fn flush_result(agent: &mut Agent, uid: &str) -> pb::FlushResult {
    match agent
        .expect(
            |m| matches!(m, Out::FlushResult(r) if r.request_uid == uid),
            "flush result",
        )
        .await
    {
        Out::FlushResult(result) => result,
        _ => unreachable!(),
    }
}

/// `author name <email>` of a commit, from the git CLI.
fn author_of(repo: &BareRepo, commit: &str) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo.path())
        .args(["log", "-1", "--format=%an <%ae>", commit])
        .output()
        .expect("git runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn a_flush_commits_the_pending_changes_now_as_the_requester_with_her_message() {
    let repo = BareRepo::new();
    let writer = Writer::start(LONG_WINDOW).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare(DEST, &repo.file_url(), "main", "clusters/prod")
        .await;
    // Two changes by two people, waiting for a window that never ends in this test.
    agent
        .send(upsert_by(
            DEST,
            1,
            "core/v1/configmaps/shop/a.yaml",
            &configmap("shop", "a", "1"),
            "bob",
        ))
        .await;
    agent
        .send(upsert_by(
            DEST,
            2,
            "core/v1/configmaps/shop/b.yaml",
            &configmap("shop", "b", "1"),
            "carol",
        ))
        .await;
    agent
        .send(flush(
            DEST,
            3,
            "Release 4.2\r\n\r\nBumps the shop settings.\n",
            "alice",
            "req-1",
        ))
        .await;
    let result = flush_result(&mut agent, "req-1").await;
    assert_eq!(result.outcome(), pb::FlushOutcome::Committed, "{result:?}");
    assert_eq!(result.destination, DEST);
    assert_eq!(result.branch, "main");
    assert_eq!(
        repo.rev_parse("main").as_deref(),
        Some(result.commit_sha.as_str()),
        "the commit is pushed before the answer"
    );
    assert_eq!(agent.ack(DEST, 3).await, result.commit_sha);
    assert_eq!(repo.commit_count("main"), 1, "one commit for both changes");
    let message = repo.tip_message("main");
    assert!(
        message.starts_with("Release 4.2\n\nBumps the shop settings.\n\n"),
        "{message}"
    );
    for trailer in [
        "X-ConfigButler-ClusterUID: uid-1",
        "X-ConfigButler-InstanceID: agent-0",
        "X-ConfigButler-CommitRequest: gitops/req-1",
    ] {
        assert!(message.contains(trailer), "missing {trailer} in {message}");
    }
    assert_eq!(
        author_of(&repo, "main"),
        "alice <alice@noreply.cluster.local>"
    );
    for name in ["a", "b"] {
        assert_eq!(
            repo.read(
                "main",
                &format!("clusters/prod/core/v1/configmaps/shop/{name}.yaml")
            )
            .unwrap(),
            configmap("shop", name, "1")
        );
    }

    // Nothing pending: no empty commit; the answer names the tip that already holds everything.
    agent.send(flush(DEST, 4, "Again", "alice", "req-2")).await;
    let again = flush_result(&mut agent, "req-2").await;
    assert_eq!(again.outcome(), pb::FlushOutcome::NothingPending);
    assert_eq!(again.commit_sha, result.commit_sha);
    assert_eq!(repo.commit_count("main"), 1);
    writer.stop().await;
}

#[tokio::test]
async fn without_a_message_or_an_author_the_usual_message_and_the_bot_are_used() {
    let repo = BareRepo::new();
    let writer = Writer::start(LONG_WINDOW).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.send(flush(DEST, 2, "", "", "req-1")).await;
    let result = flush_result(&mut agent, "req-1").await;
    assert_eq!(result.outcome(), pb::FlushOutcome::Committed);
    let message = repo.tip_message("main");
    assert!(
        message.starts_with("[CREATE] core/v1/configmaps/ns/a\n"),
        "{message}"
    );
    assert!(message.contains("X-ConfigButler-CommitRequest: gitops/req-1"));
    assert_eq!(
        author_of(&repo, "main"),
        "GitOps Reverser <gitops-reverser@noreply.cluster.local>",
        "the writer's bot identity"
    );
    writer.stop().await;
}

#[tokio::test]
async fn malformed_messages_are_refused_and_the_changes_keep_waiting() {
    let repo = BareRepo::new();
    let writer = Writer::start(LONG_WINDOW).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    let long = format!("subject\n\n{}", "x".repeat(9 * 1024));
    for (sequence, message) in [
        (2, "nul\0inside"),
        (3, "two\nline subject"),
        (4, "\nno subject"),
        (5, long.as_str()),
        (6, "ok\n\nX-ConfigButler-ClusterUID: forged"),
    ] {
        agent
            .send(flush(DEST, sequence, message, "alice", "bad"))
            .await;
        let reject = agent.reject(sequence).await;
        assert_eq!(reject.reason, "InvalidFlush", "{message:?}: {reject:?}");
    }
    // Still nothing committed; a valid request then commits the waiting change.
    assert_eq!(repo.rev_parse("main"), None);
    agent.send(flush(DEST, 7, "Fine", "alice", "good")).await;
    let result = flush_result(&mut agent, "good").await;
    assert_eq!(result.outcome(), pb::FlushOutcome::Committed);
    assert_eq!(repo.commit_count("main"), 1);
    assert!(repo.tip_message("main").starts_with("Fine\n\n"));
    writer.stop().await;
}

#[tokio::test]
async fn a_flood_of_requests_on_an_empty_queue_makes_no_commit_and_holds_nothing_else_back() {
    let repo = BareRepo::new();
    let other = BareRepo::new();
    let writer = Writer::start(LONG_WINDOW).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    agent
        .declare("gitops/other", &other.file_url(), "main", "c")
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.send(flush(DEST, 2, "First", "alice", "req-0")).await;
    let first = flush_result(&mut agent, "req-0").await;
    assert_eq!(first.outcome(), pb::FlushOutcome::Committed);
    for i in 1..=100u64 {
        agent
            .send(flush(DEST, 2 + i, "Flood", "alice", &format!("req-{i}")))
            .await;
    }
    // Another destination's change and its own request go through meanwhile.
    agent
        .send(upsert(
            "gitops/other",
            1,
            "core/v1/configmaps/ns/b.yaml",
            &configmap("ns", "b", "1"),
        ))
        .await;
    agent
        .send(flush("gitops/other", 2, "Other", "bob", "other-1"))
        .await;
    let other_result = flush_result(&mut agent, "other-1").await;
    assert_eq!(other_result.outcome(), pb::FlushOutcome::Committed);
    assert_eq!(
        other.rev_parse("main").as_deref(),
        Some(other_result.commit_sha.as_str())
    );
    for i in 1..=100u64 {
        let result = flush_result(&mut agent, &format!("req-{i}")).await;
        assert_eq!(result.outcome(), pb::FlushOutcome::NothingPending);
        assert_eq!(result.commit_sha, first.commit_sha);
    }
    agent.ack(DEST, 102).await;
    assert_eq!(repo.commit_count("main"), 1, "no empty commits");
    writer.stop().await;
}
