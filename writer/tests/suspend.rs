//! Suspended destinations over the real gRPC protocol and real git: held changes are previewed and acked but not
//! pushed, other destinations of the same worker keep pushing, resuming writes exactly the previewed files, and
//! what is held survives an agent reconnect and (through the agent's relist) a writer restart.

mod support;

use std::collections::BTreeSet;

use reverser_proto::v1::{self as pb, agent_message::Kind as In, writer_message::Kind as Out};
use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";
const OTHER: &str = "gitops/other";
const CM: &str = "core/v1/configmaps/shop";

fn declaration(key: &str, repo: &BareRepo, base: &str, suspend: bool) -> pb::AgentMessage {
    let mut message = destination(key, &repo.file_url(), "main", base, false);
    if let Some(In::Destination(d)) = &mut message.kind {
        d.suspend = suspend;
    }
    message
}

async fn declare(agent: &mut Agent, key: &str, repo: &BareRepo, base: &str, suspend: bool) {
    agent.send(declaration(key, repo, base, suspend)).await;
    agent
        .expect(
            |m| matches!(m, Out::DestinationStatus(s) if s.destination == key && s.r#type == "Accepted"),
            "destination accepted",
        )
        .await;
}

/// The next preview for DEST that satisfies `done` (earlier ones are skipped).
async fn preview(
    agent: &mut Agent,
    done: impl Fn(&pb::SuspendPreview) -> bool,
) -> pb::SuspendPreview {
    loop {
        match agent
            .expect(
                |m| matches!(m, Out::SuspendPreview(p) if p.destination == DEST),
                "a suspend preview",
            )
            .await
        {
            Out::SuspendPreview(p) if done(&p) => return p,
            _ => {}
        }
    }
}

fn preview_paths(p: &pb::SuspendPreview) -> BTreeSet<String> {
    p.added_paths
        .iter()
        .chain(&p.changed_paths)
        .chain(&p.deleted_paths)
        .cloned()
        .collect()
}

/// Files that differ between two commits of the bare repository.
fn changed_between(repo: &BareRepo, from: &str, to: &str) -> BTreeSet<String> {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args(["diff", "--no-renames", "--name-only", from, to])
        .output()
        .expect("git diff");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn path(name: &str) -> String {
    format!("{CM}/{name}.yaml")
}

fn full(name: &str) -> String {
    format!("c/{CM}/{name}.yaml")
}

#[tokio::test]
async fn a_suspended_destination_previews_pushes_nothing_and_resuming_writes_exactly_the_preview() {
    let repo = BareRepo::new();
    repo.commit_as_human(
        "main",
        &full("changed"),
        &configmap("shop", "changed", "old"),
        "seed",
    );
    repo.commit_as_human(
        "main",
        &full("same"),
        &configmap("shop", "same", "1"),
        "seed",
    );
    repo.commit_as_human(
        "main",
        &full("gone"),
        &configmap("shop", "gone", "1"),
        "seed",
    );
    // A file a person pushed that no object backs: the snapshot sweep's orphan.
    repo.commit_as_human(
        "main",
        &full("orphan"),
        &configmap("shop", "orphan", "1"),
        "a person's file",
    );
    let seeded = repo.rev_parse("main").unwrap();

    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    declare(&mut agent, DEST, &repo, "c", true).await;
    declare(&mut agent, OTHER, &repo, "other", false).await;
    // Admins see which destinations are suspended.
    let listed =
        reverser_proto::v1::writer_admin_client::WriterAdminClient::connect(writer.grpc_url())
            .await
            .unwrap()
            .list_destinations(pb::ListDestinationsRequest {})
            .await
            .unwrap()
            .into_inner()
            .destinations;
    let suspended: BTreeSet<(String, bool)> =
        listed.iter().map(|d| (d.key.clone(), d.suspend)).collect();
    assert_eq!(
        suspended,
        BTreeSet::from([(DEST.to_owned(), true), (OTHER.to_owned(), false)])
    );

    let configmaps = || scope("", "v1", "configmaps", "");
    agent.send(snapshot_begin(DEST, 1, configmaps(), 7)).await;
    agent
        .send(upsert(
            DEST,
            2,
            &path("new"),
            &configmap("shop", "new", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            3,
            &path("changed"),
            &configmap("shop", "changed", "new"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            4,
            &path("same"),
            &configmap("shop", "same", "1"),
        ))
        .await;
    agent.send(snapshot_end(DEST, 5, configmaps(), 7)).await;
    agent.send(delete(DEST, 6, &path("gone"))).await;
    // Held changes are acked without a commit: a suspended destination fills no agent's unacked budget.
    assert_eq!(agent.ack(DEST, 6).await, "", "acked as held, not pushed");

    let held = preview(&mut agent, |p| p.held_messages > 0 && p.deleted == 2).await;
    assert_eq!(
        held.added_paths,
        vec![
            "c/.configbutler/owner.yaml".to_owned(),
            "c/.sourceignore".to_owned(),
            full("new")
        ],
        "{held:?}"
    );
    assert_eq!(held.changed_paths, vec![full("changed")], "{held:?}");
    assert_eq!(
        held.deleted_paths,
        vec![full("gone"), full("orphan")],
        "{held:?}"
    );
    assert_eq!((held.added, held.changed, held.deleted), (3, 1, 2));
    assert_eq!(held.paths_cap, 50);
    assert_eq!(held.base_commit, seeded);

    // Another destination of the same worker keeps pushing.
    agent
        .send(upsert(OTHER, 1, &path("x"), &configmap("shop", "x", "1")))
        .await;
    let other_sha = agent.ack(OTHER, 1).await;
    assert!(!other_sha.is_empty());
    assert_eq!(
        changed_between(&repo, &seeded, &other_sha),
        BTreeSet::from([
            "other/.configbutler/owner.yaml".to_owned(),
            "other/.sourceignore".to_owned(),
            format!("other/{CM}/x.yaml")
        ]),
        "nothing of the suspended destination was pushed"
    );
    assert_eq!(
        repo.read("main", &full("changed")).unwrap(),
        configmap("shop", "changed", "old")
    );

    // Resume: one flush writes exactly the previewed files.
    declare(&mut agent, DEST, &repo, "c", false).await;
    let pushed = match agent
        .expect(
            |m| matches!(m, Out::Ack(a) if a.destination == DEST && !a.commit_sha.is_empty()),
            "the resumed destination's push",
        )
        .await
    {
        Out::Ack(ack) => ack.commit_sha,
        _ => unreachable!(),
    };
    assert_eq!(repo.rev_parse("main").as_deref(), Some(pushed.as_str()));
    assert_eq!(
        changed_between(&repo, &other_sha, &pushed),
        preview_paths(&held)
    );
    assert_eq!(
        repo.read("main", &full("changed")).unwrap(),
        configmap("shop", "changed", "new")
    );
    assert!(repo.read("main", &full("orphan")).is_none());
    writer.stop().await;
}

#[tokio::test]
async fn held_changes_survive_an_agent_reconnect_and_a_writer_restart_with_the_relist() {
    let repo = BareRepo::new();
    repo.commit_as_human(
        "main",
        &full("gone"),
        &configmap("shop", "gone", "1"),
        "seed",
    );
    let seeded = repo.rev_parse("main").unwrap();
    let writer = Writer::start(&[]).await;

    // The first agent stream holds a write and a delete, then goes away.
    let mut first = writer.agent("uid-1").await;
    declare(&mut first, DEST, &repo, "c", true).await;
    first
        .send(upsert(DEST, 1, &path("a"), &configmap("shop", "a", "1")))
        .await;
    first.send(delete(DEST, 2, &path("gone"))).await;
    first.ack(DEST, 2).await;
    preview(&mut first, |p| p.added == 3 && p.deleted == 1).await;
    drop(first);

    // The agent reconnects (new stream, sequences start again): the writer still holds the first stream's changes.
    let mut second = writer.agent("uid-1").await;
    declare(&mut second, DEST, &repo, "c", true).await;
    // Three relists of the same objects are held once each (compacted), not three times.
    let configmaps = || scope("", "v1", "configmaps", "");
    let mut sequence = 0;
    for epoch in 1..=3 {
        sequence += 1;
        second
            .send(snapshot_begin(DEST, sequence, configmaps(), epoch))
            .await;
        for name in ["a", "b"] {
            sequence += 1;
            second
                .send(upsert(
                    DEST,
                    sequence,
                    &path(name),
                    &configmap("shop", name, "1"),
                ))
                .await;
        }
        sequence += 1;
        second
            .send(snapshot_end(DEST, sequence, configmaps(), epoch))
            .await;
    }
    second.ack(DEST, sequence).await;
    let before = preview(&mut second, |p| p.added == 4).await;
    assert_eq!(
        before.added_paths,
        vec![
            "c/.configbutler/owner.yaml".to_owned(),
            "c/.sourceignore".to_owned(),
            full("a"),
            full("b")
        ]
    );
    assert_eq!(before.deleted_paths, vec![full("gone")], "{before:?}");
    // a, b, the delete of gone and one sweep of the configmaps scope.
    assert_eq!(before.held_messages, 4, "{before:?}");
    drop(second);

    // A writer restart loses what it held (it was acked) and pushes none of it.
    let work_dir = writer.stop().await;
    assert_eq!(repo.rev_parse("main").as_deref(), Some(seeded.as_str()));
    let writer = Writer::start_in(work_dir, &[]).await;
    // After every reconnect the agent relists everything: that rebuilds the held changes, the sweep finds the
    // deleted object's file.
    let mut third = writer.agent("uid-1").await;
    declare(&mut third, DEST, &repo, "c", true).await;
    third.send(snapshot_begin(DEST, 1, configmaps(), 9)).await;
    for (sequence, name) in [(2, "a"), (3, "b")] {
        third
            .send(upsert(
                DEST,
                sequence,
                &path(name),
                &configmap("shop", name, "1"),
            ))
            .await;
    }
    third.send(snapshot_end(DEST, 4, configmaps(), 9)).await;
    let after = preview(&mut third, |p| p.added == 4 && p.deleted == 1).await;
    assert_eq!(preview_paths(&after), preview_paths(&before));

    declare(&mut third, DEST, &repo, "c", false).await;
    let pushed = match third
        .expect(
            |m| matches!(m, Out::Ack(a) if a.destination == DEST && !a.commit_sha.is_empty()),
            "the resumed destination's push",
        )
        .await
    {
        Out::Ack(ack) => ack.commit_sha,
        _ => unreachable!(),
    };
    assert_eq!(
        changed_between(&repo, &seeded, &pushed),
        preview_paths(&after)
    );
    writer.stop().await;
}

/// A measurement, not a check (run with `--ignored --nocapture`): `SUSPEND_BACKLOG` objects (default 100 000)
/// upserted to a suspended destination, then the same again (a relist); prints how long the held changes took to
/// be acked and previewed, and the writer process's peak RSS.
#[tokio::test]
#[ignore = "a measurement of a 100,000-object suspended backlog, not a check; run with --ignored --nocapture"]
async fn measure_a_large_suspended_backlog() {
    let objects: u64 = std::env::var("SUSPEND_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    declare(&mut agent, DEST, &repo, "c", true).await;
    let started = std::time::Instant::now();
    let mut sequence = 0;
    for round in 0..2 {
        for i in 0..objects {
            sequence += 1;
            let name = format!("cm-{i}");
            agent
                .send(upsert(
                    DEST,
                    sequence,
                    &path(&name),
                    &configmap("shop", &name, &round.to_string()),
                ))
                .await;
            // As the agent does with its default --max-unacked: at most 1000 unacked messages.
            if sequence % 1000 == 0 {
                agent.ack(DEST, sequence).await;
                agent.seen.retain(|m| !matches!(m, Out::Ack(_)));
            }
        }
    }
    if sequence % 1000 != 0 {
        agent.ack(DEST, sequence).await;
    }
    let acked = started.elapsed();
    let held = preview(&mut agent, |p| {
        p.held_messages == objects && p.added == objects + 1
    })
    .await;
    let previewed = started.elapsed();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: ?");
    println!(
        "{objects} objects sent twice: all acked after {acked:?}, preview ({} added, {} paths listed) after {previewed:?}; {peak}",
        held.added,
        held.added_paths.len()
    );
    assert_eq!(repo.rev_parse("main"), None, "nothing pushed");
    writer.stop().await;
}
