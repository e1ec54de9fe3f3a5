//! A batch whose commit git refuses to build, for a reason the planner does not foresee, must not fail forever and
//! hold back every destination of the branch: the message that cannot be committed is found by splitting the
//! batch, refused once with `CommitRefused`, and everything else is committed.

mod support;

use reverser_proto::v1::writer_message::Kind as Out;
use support::*;
use testkit::BareRepo;

fn object(name: &str) -> String {
    format!("core/v1/configmaps/ns/{name}.yaml")
}

/// Sends one batch of eight messages on seven files (the flush cap): seven for `gitops/d`, the sixth of which
/// rewrites the first one's file, and, fourth, one for `gitops/c`. Returns the batch's last sequence of d.
async fn send_batch(agent: &mut Agent, first_d: u64, c_sequence: u64) -> u64 {
    for (n, sequence) in (first_d..first_d + 7).enumerate() {
        let (name, value) = if n == 4 {
            (format!("d{first_d}"), "2")
        } else {
            (format!("d{sequence}"), "1")
        };
        agent
            .send(upsert(
                "gitops/d",
                sequence,
                &object(&name),
                &configmap("ns", &name, value),
            ))
            .await;
        if n == 2 {
            let name = format!("c{c_sequence}");
            agent
                .send(upsert(
                    "gitops/c",
                    c_sequence,
                    &object(&name),
                    &configmap("ns", &name, "1"),
                ))
                .await;
        }
    }
    first_d + 6
}

fn d_file(repo: &BareRepo, sequence: u64) -> Option<String> {
    repo.read("main", &format!("d/{}", object(&format!("d{sequence}"))))
}

async fn expect_refused(agent: &mut Agent, sequence: u64) -> reverser_proto::v1::Reject {
    match agent
        .expect(
            |m| matches!(m, Out::Reject(r) if r.destination == "gitops/c" && r.sequence == sequence),
            "the refusal of gitops/c's change",
        )
        .await
    {
        Out::Reject(reject) => reject,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn a_change_git_refuses_to_commit_is_refused_alone_and_the_worker_keeps_working() {
    let repo = BareRepo::new();
    // A person made a folder where the writer keeps destination c's ownership marker (a file): the planner
    // accepts c's writes, but no commit that adds the marker can be built on this branch.
    repo.commit_as_human(
        "main",
        "c/.configbutler/owner.yaml/notes.txt",
        "mine\n",
        "a folder where the marker goes",
    );
    let writer = Writer::start(&[
        "--git-batch-max-wait-sec",
        "600",
        "--git-batch-max-files",
        "7",
    ])
    .await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare("gitops/c", &repo.file_url(), "main", "c")
        .await;
    agent
        .declare("gitops/d", &repo.file_url(), "main", "d")
        .await;

    let last = send_batch(&mut agent, 1, 1).await;
    agent.ack("gitops/d", last).await;
    let refused = expect_refused(&mut agent, 1).await;
    assert_eq!(refused.reason, "CommitRefused", "{refused:?}");
    assert!(
        refused.message.contains("c/.configbutler/owner.yaml"),
        "{refused:?}"
    );
    // Everything else landed, in arrival order: the rewrite of d1 (in the other half of the split) won.
    assert_eq!(d_file(&repo, 1), Some(configmap("ns", "d1", "2")));
    for n in [2, 3, 4, 6, 7] {
        assert_eq!(
            d_file(&repo, n),
            Some(configmap("ns", &format!("d{n}"), "1"))
        );
    }
    assert_eq!(repo.read("main", &format!("c/{}", object("c1"))), None);
    assert_eq!(
        repo.read("main", "c/.configbutler/owner.yaml/notes.txt")
            .as_deref(),
        Some("mine\n")
    );

    // The worker keeps working: the next batch lands too, and only c's new change is refused.
    let last = send_batch(&mut agent, 8, 2).await;
    agent.ack("gitops/d", last).await;
    let refused = expect_refused(&mut agent, 2).await;
    assert_eq!(refused.reason, "CommitRefused", "{refused:?}");
    assert_eq!(d_file(&repo, 8), Some(configmap("ns", "d8", "2")));
    assert_eq!(d_file(&repo, 14), Some(configmap("ns", "d14", "1")));

    // Each refused message was reported once, and nothing else was refused.
    let rest = agent.drain_for(std::time::Duration::from_millis(300)).await;
    let rejects: Vec<_> = rest
        .iter()
        .filter(|m| matches!(m, Out::Reject(_)))
        .collect();
    assert!(rejects.is_empty(), "{rejects:?}");
    let metrics = writer.metrics().await;
    assert!(
        metrics.contains("gitops_reverser_messages_rejected_total{reason=\"CommitRefused\"} 2"),
        "{metrics}"
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_build_that_fails_for_the_machine_refuses_nothing_and_lands_once_the_fault_is_gone() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare("gitops/d", &repo.file_url(), "main", "d")
        .await;
    agent
        .send(upsert(
            "gitops/d",
            1,
            &object("a"),
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.ack("gitops/d", 1).await;

    // The clone's pack folder becomes unwritable (a file stands in its place; the writer runs as any user, so
    // permissions would not stop root): every commit build fails, for no fault of the messages.
    let clone = writer
        .work_dir
        .path()
        .join(reverser_writer::git::worker_id(&repo.file_url(), "main"));
    let packs = clone.join("objects").join("pack");
    let away = clone.join("objects").join("pack.away");
    std::fs::rename(&packs, &away).unwrap();
    std::fs::write(&packs, "not a folder").unwrap();
    agent
        .send(upsert(
            "gitops/d",
            2,
            &object("b"),
            &configmap("ns", "b", "1"),
        ))
        .await;
    agent
        .send(upsert(
            "gitops/d",
            3,
            &object("c"),
            &configmap("ns", "c", "1"),
        ))
        .await;
    let failing = agent.status("gitops/d", "PushFailing").await;
    assert_eq!(failing.status, "True", "{failing:?}");

    std::fs::remove_file(&packs).unwrap();
    std::fs::rename(&away, &packs).unwrap();
    agent.ack("gitops/d", 3).await;
    assert_eq!(
        repo.read("main", &format!("d/{}", object("b"))),
        Some(configmap("ns", "b", "1"))
    );
    assert_eq!(
        repo.read("main", &format!("d/{}", object("c"))),
        Some(configmap("ns", "c", "1"))
    );
    let replies = agent.drain_for(std::time::Duration::from_millis(300)).await;
    assert!(
        !replies.iter().any(|m| matches!(m, Out::Reject(_))),
        "{replies:?}"
    );
    writer.stop().await;
}
