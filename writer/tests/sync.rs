//! End-to-end behaviour of the writer over its real gRPC protocol, pushing to real git repositories
//! (bare repos over file://, inspected with the git CLI).

mod support;

use std::time::Duration;

use reverser_proto::v1::{self as pb, writer_message::Kind as Out};
use support::*;
use testkit::{BareRepo, HttpGitServer};

const DEST: &str = "gitops/prod";

#[tokio::test]
async fn upsert_lands_as_a_commit_with_marker_and_trailers_and_is_acked_after_the_push() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare(DEST, &repo.file_url(), "main", "clusters/prod")
        .await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/shop/settings.yaml",
            &configmap("shop", "settings", "a"),
        ))
        .await;
    let sha = agent.ack(DEST, 1).await;

    assert_eq!(
        repo.rev_parse("main").as_deref(),
        Some(sha.as_str()),
        "acked only once pushed"
    );
    assert_eq!(
        repo.read(
            "main",
            "clusters/prod/core/v1/configmaps/shop/settings.yaml"
        )
        .unwrap(),
        configmap("shop", "settings", "a")
    );
    let marker = repo
        .read("main", "clusters/prod/.configbutler/owner.yaml")
        .unwrap();
    assert!(marker.contains("clusterUID: uid-1"), "{marker}");
    let message = repo.tip_message("main");
    assert!(
        message.starts_with("[CREATE] core/v1/configmaps/shop/settings\n"),
        "{message}"
    );
    for trailer in [
        "X-ConfigButler-ClusterUID: uid-1",
        "X-ConfigButler-ControllerNS: gitops-reverser",
        "X-ConfigButler-ControllerName: reverser",
        "X-ConfigButler-InstanceID: agent-0",
    ] {
        assert!(message.contains(trailer), "missing {trailer} in {message}");
    }
    writer.stop().await;
}

#[tokio::test]
async fn changes_within_the_wait_are_batched_latest_content_wins_and_equal_content_is_a_no_op() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--git-batch-max-wait-sec", "1"]).await;
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
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/ns/b.yaml",
            &configmap("ns", "b", "1"),
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            3,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "2"),
        ))
        .await;
    agent.ack(DEST, 3).await;
    assert_eq!(
        repo.commit_count("main"),
        1,
        "one flush, one author: one commit"
    );
    assert_eq!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml").unwrap(),
        configmap("ns", "a", "2")
    );
    assert!(
        repo.tip_message("main")
            .starts_with("Sync 2 objects in c: 2 created\n")
    );

    // Same value, other formatting: acked, no commit.
    let reformatted =
        "kind: ConfigMap\napiVersion: v1\nmetadata: {name: a, namespace: ns}\ndata: {key: 2}\n";
    agent
        .send(upsert(DEST, 4, "core/v1/configmaps/ns/a.yaml", reformatted))
        .await;
    agent
        .send(delete(DEST, 5, "core/v1/configmaps/ns/never-existed.yaml"))
        .await;
    agent.ack(DEST, 5).await;
    assert_eq!(
        repo.commit_count("main"),
        1,
        "a semantic no-op makes no commit"
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_concurrent_human_commit_survives_the_replay() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
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
    agent.ack(DEST, 1).await;

    // A human pushes behind the writer's back; the writer's next push is rejected, it fetches and replays.
    repo.commit_as_human("main", "docs/README.md", "hello\n", "docs: add readme");
    repo.commit_as_human(
        "main",
        "c/core/v1/configmaps/ns/a.yaml",
        &configmap("ns", "a", "human"),
        "hand edit",
    );
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/ns/b.yaml",
            &configmap("ns", "b", "1"),
        ))
        .await;
    agent.ack(DEST, 2).await;

    let subjects = repo.log_subjects("main");
    assert_eq!(subjects.len(), 4, "{subjects:?}");
    assert_eq!(subjects[1], "hand edit");
    assert_eq!(
        repo.read("main", "docs/README.md").as_deref(),
        Some("hello\n"),
        "the human's commit survived"
    );
    assert_eq!(
        repo.read("main", "c/core/v1/configmaps/ns/b.yaml").unwrap(),
        configmap("ns", "b", "1")
    );
    let metrics = writer.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gitops_reverser_rebase_retries_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
    writer.stop().await;
}

#[tokio::test]
async fn snapshot_end_deletes_orphans_of_its_scope_only_within_the_cap() {
    const KEPT: &str =
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: kept, namespace: shop}\n";
    let repo = BareRepo::new();
    for (path, content) in [
        ("c/apps/v1/deployments/shop/kept.yaml", "a: 1\n"),
        ("c/apps/v1/deployments/shop/orphan-1.yaml", "a: 1\n"),
        ("c/apps/v1/deployments/shop/orphan-2.yaml", "a: 1\n"),
        ("c/apps/v1/deployments/shop/orphan-3.yaml", "a: 1\n"),
        ("c/apps/v1/deployments/shop/NOTES.md", "keep me\n"),
        ("c/core/v1/configmaps/shop/other-scope.yaml", "a: 1\n"),
        ("outside/apps/v1/deployments/shop/x.yaml", "a: 1\n"),
    ] {
        repo.commit_as_human("main", path, content, "seed");
    }
    let writer = Writer::start(&["--deletes-cap-per-cycle", "2"]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let deployments = || scope("apps", "v1", "deployments", "");
    agent.send(snapshot_begin(DEST, 1, deployments(), 1)).await;
    agent
        .send(upsert(DEST, 2, "apps/v1/deployments/shop/kept.yaml", KEPT))
        .await;
    agent.send(snapshot_end(DEST, 3, deployments(), 1)).await;
    let pushed = agent.ack(DEST, 3).await;
    // The agent hears what the sweep deleted (it becomes an Event on the GitDestination).
    let report = match agent
        .expect(
            |m| matches!(m, Out::SweepReport(r) if r.destination == DEST),
            "a sweep report",
        )
        .await
    {
        Out::SweepReport(report) => report,
        _ => unreachable!(),
    };
    assert_eq!(
        (report.deleted, report.left, report.commit_sha.as_str()),
        (2, 1, pushed.as_str())
    );
    let files = repo.ls_tree("main");
    assert!(
        !files.contains(&"c/apps/v1/deployments/shop/orphan-1.yaml".to_owned()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"c/apps/v1/deployments/shop/orphan-2.yaml".to_owned()),
        "{files:?}"
    );
    assert!(
        files.contains(&"c/apps/v1/deployments/shop/orphan-3.yaml".to_owned()),
        "cap of 2: {files:?}"
    );
    for kept in [
        "c/apps/v1/deployments/shop/kept.yaml",
        "c/apps/v1/deployments/shop/NOTES.md",
        "c/core/v1/configmaps/shop/other-scope.yaml",
        "outside/apps/v1/deployments/shop/x.yaml",
    ] {
        assert!(
            files.contains(&kept.to_owned()),
            "{kept} must stay: {files:?}"
        );
    }
    // The truncation is visible: a condition and a gauge with the number left.
    let incomplete = agent.status(DEST, "SweepIncomplete").await;
    assert_eq!(
        (incomplete.status.as_str(), incomplete.reason.as_str()),
        ("True", "DeleteCapReached")
    );
    assert!(incomplete.message.starts_with("1 orphan"), "{incomplete:?}");
    let pending = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("gitops_reverser_orphans_pending{destination=\"gitops/prod\"}"))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(pending(&writer.metrics().await).as_deref(), Some("1"));
    assert!(
        writer
            .metrics()
            .await
            .contains("gitops_reverser_sweeps_truncated_total{destination=\"gitops/prod\"} 1")
    );
    // The next snapshot takes the rest.
    agent.send(snapshot_begin(DEST, 4, deployments(), 2)).await;
    agent
        .send(upsert(DEST, 5, "apps/v1/deployments/shop/kept.yaml", KEPT))
        .await;
    agent.send(snapshot_end(DEST, 6, deployments(), 2)).await;
    agent.ack(DEST, 6).await;
    assert!(
        !repo
            .ls_tree("main")
            .contains(&"c/apps/v1/deployments/shop/orphan-3.yaml".to_owned())
    );
    let complete = agent.status(DEST, "SweepIncomplete").await;
    assert_eq!(
        (complete.status.as_str(), complete.reason.as_str()),
        ("False", "SweepComplete")
    );
    assert_eq!(pending(&writer.metrics().await).as_deref(), Some("0"));
    writer.stop().await;
}

#[tokio::test]
async fn foreign_marker_blocks_an_exclusive_destination_and_only_warns_a_shared_one() {
    let repo = BareRepo::new();
    let foreign =
        "clusterUID: someone-else\ncontrollerNamespace: x\ncontrollerName: y\ninstanceID: z\n";
    repo.commit_as_human(
        "main",
        "excl/.configbutler/owner.yaml",
        foreign,
        "other owner",
    );
    repo.commit_as_human(
        "main",
        "shared/.configbutler/owner.yaml",
        foreign,
        "other owner",
    );
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(destination(
            "gitops/excl",
            &repo.file_url(),
            "main",
            "excl",
            true,
        ))
        .await;
    agent
        .send(destination(
            "gitops/shared",
            &repo.file_url(),
            "main",
            "shared",
            false,
        ))
        .await;
    agent
        .send(upsert(
            "gitops/excl",
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    let rejected = agent.reject(1).await;
    assert_eq!(rejected.reason, "MarkerConflict");
    let status = agent.status("gitops/excl", "MarkerConflict").await;
    assert!(
        status.message.contains("someone-else"),
        "{}",
        status.message
    );
    assert!(
        repo.read("main", "excl/core/v1/configmaps/ns/a.yaml")
            .is_none(),
        "nothing written"
    );

    agent
        .send(upsert(
            "gitops/shared",
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.ack("gitops/shared", 1).await;
    assert!(
        repo.read("main", "shared/core/v1/configmaps/ns/a.yaml")
            .is_some()
    );
    assert_eq!(
        repo.read("main", "shared/.configbutler/owner.yaml")
            .unwrap(),
        foreign,
        "marker left alone"
    );
    writer.stop().await;
}

#[tokio::test]
async fn bad_input_is_rejected_with_a_reason_and_changes_nothing() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--max-object-bytes", "1000"]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let cm = configmap("ns", "a", "1");
    let cases: Vec<(u64, reverser_proto::v1::AgentMessage, &str)> = vec![
        (1, upsert(DEST, 1, "/etc/passwd.yaml", &cm), "InvalidPath"),
        (2, upsert(DEST, 2, "../escape.yaml", &cm), "InvalidPath"),
        (
            3,
            upsert(DEST, 3, "core/../../escape.yaml", &cm),
            "InvalidPath",
        ),
        (
            4,
            upsert(DEST, 4, ".configbutler/owner.yaml", &cm),
            "InvalidPath",
        ),
        (
            5,
            upsert(DEST, 5, "core/v1/configmaps/ns/a.json", &cm),
            "InvalidPath",
        ),
        (
            6,
            upsert(DEST, 6, "core/v1/configmaps/ns/a.yaml", "key: [unclosed\n"),
            "InvalidYaml",
        ),
        (
            7,
            upsert(DEST, 7, "core/v1/configmaps/ns/a.yaml", "- a list\n"),
            "InvalidYaml",
        ),
        (
            8,
            upsert(
                DEST,
                8,
                "core/v1/configmaps/ns/a.yaml",
                &format!("data: \"{}\"\n", "x".repeat(2000)),
            ),
            "ObjectTooLarge",
        ),
        (
            9,
            upsert("gitops/unknown", 9, "core/v1/configmaps/ns/a.yaml", &cm),
            "UnknownDestination",
        ),
        (
            10,
            snapshot_end(DEST, 10, scope("", "v1", "configmaps", ""), 1),
            "SnapshotMismatch",
        ),
        (
            11,
            snapshot_begin(DEST, 11, scope("", "v1", "../x", ""), 1),
            "InvalidScope",
        ),
        (12, delete(DEST, 12, "../x.yaml"), "InvalidPath"),
        (
            13,
            upsert(
                DEST,
                13,
                "core/v1/secrets/ns/db.yaml",
                "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: ns}\ndata: {password: aHVudGVyMg==}\n",
            ),
            "PlaintextSecret",
        ),
    ];
    for (sequence, message, reason) in cases {
        agent.send(message).await;
        let reject = agent.reject(sequence).await;
        assert_eq!(
            reject.reason, reason,
            "sequence {sequence}: {}",
            reject.message
        );
        assert!(!reject.message.is_empty());
    }
    // Sequence numbers must grow.
    agent
        .send(upsert(DEST, 13, "core/v1/configmaps/ns/a.yaml", &cm))
        .await;
    assert_eq!(agent.reject(13).await.reason, "OutOfOrder");
    // Invalid destinations.
    for (key, url, branch, base, reason) in [
        (
            "gitops/bad-branch",
            repo.file_url(),
            "main..x",
            "b",
            "InvalidDestination",
        ),
        (
            "gitops/bad-base",
            repo.file_url(),
            "main",
            "/abs",
            "InvalidDestination",
        ),
        (
            "gitops/bad-base2",
            repo.file_url(),
            "main",
            "a/../b",
            "InvalidDestination",
        ),
        (
            "gitops/bad-url",
            "ftp://example.com/x".into(),
            "main",
            "b",
            "InvalidDestination",
        ),
        (
            "no-slash",
            repo.file_url(),
            "main",
            "b",
            "InvalidDestination",
        ),
        (
            "gitops/overlap",
            repo.file_url(),
            "main",
            "c/sub",
            "OverlappingBaseFolder",
        ),
    ] {
        agent
            .send(destination(key, &url, branch, base, false))
            .await;
        let reject = agent
            .expect(|m| matches!(m, Out::Reject(r) if r.destination == key), key)
            .await;
        let Out::Reject(reject) = reject else {
            unreachable!()
        };
        assert_eq!(reject.reason, reason, "{key}: {}", reject.message);
    }
    assert!(repo.rev_parse("main").is_none(), "nothing was ever pushed");
    writer.stop().await;
}

/// What YAML 1.1 readers (PyYAML, go-yaml v2) refuse or read differently is refused, and the stream goes on.
#[tokio::test]
async fn yaml_that_readers_refuse_or_misread_is_rejected_and_later_messages_flow() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let header = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: ns}\n";
    let hostile = [
        format!("{header}data: !!python/object/apply:os.system [echo pwned]\n"),
        format!("{header}data: !custom {{a: b}}\n"),
        format!("{header}base: {{a: b}}\ndata:\n  <<: {{a: b}}\n"),
        format!("\u{FEFF}{header}"),
        format!("{header}data: {{1: a}}\n"),
        format!("{header}data: {{yes: a}}\n"),
        format!("{header}data: {{2001-12-14: a}}\n"),
        "kind: ConfigMap\nmetadata: {name: a}\n".to_owned(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: ns}\n".to_owned(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: [a]\n".to_owned(),
        "apiVersion: v1\nkind: true\nmetadata: {name: a}\n".to_owned(),
    ];
    for (i, content) in hostile.iter().enumerate() {
        let sequence = i as u64 + 1;
        agent
            .send(upsert(
                DEST,
                sequence,
                "core/v1/configmaps/ns/a.yaml",
                content,
            ))
            .await;
        let reject = agent.reject(sequence).await;
        assert_eq!(
            reject.reason, "InvalidYaml",
            "{content:?}: {}",
            reject.message
        );
    }
    let good = format!("{header}data: {{'yes': a, \"<<\": b, '1': c, x: '!!str'}}\n");
    let next = hostile.len() as u64 + 1;
    agent
        .send(upsert(DEST, next, "core/v1/configmaps/ns/a.yaml", &good))
        .await;
    agent.ack(DEST, next).await;
    assert_eq!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml")
            .as_deref(),
        Some(good.as_str())
    );
    writer.stop().await;
}

/// Paths that cannot be checked out everywhere (Windows device names, over-long components, case-only twins) are
/// refused, and the stream goes on.
#[tokio::test]
async fn unportable_paths_are_rejected_and_later_messages_flow() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let cm = configmap("ns", "a", "1");
    let long = format!("core/v1/configmaps/ns/{}.yaml", "a".repeat(253));
    let hostile = [
        long.as_str(),
        "core/v1/configmaps/ns/con.yaml",
        "core/v1/configmaps/NUL/a.yaml",
        "core/v1/configmaps/ns/aux.d.yaml",
        "core/v1/configmaps/ns/com1.yaml",
        "core/v1/configmaps/ns/lpt9.yaml",
        "core/v1/configmaps/ns./a.yaml",
        "core/v1/configmaps/ns /a.yaml",
        "rbac.authorization.k8s.io/v1/clusterroles/Case-Demo.yaml",
        "rbac.authorization.k8s.io/v1/clusterroles/system:auth.yaml",
        "core/v1/configmaps/ns/caf\u{e9}.yaml",
        "core/v1/configmaps/ns/a%3a.yaml",
        "core/v1/configmaps/ns/a%zz.yaml",
    ];
    for (i, path) in hostile.iter().enumerate() {
        let sequence = i as u64 + 1;
        agent.send(upsert(DEST, sequence, path, &cm)).await;
        let reject = agent.reject(sequence).await;
        assert_eq!(reject.reason, "InvalidPath", "{path:?}: {}", reject.message);
    }
    let next = hostile.len() as u64 + 1;
    let fine = "rbac.authorization.k8s.io/v1/clusterroles/%43ase-%44emo%3Aview.yaml";
    agent.send(upsert(DEST, next, fine, &cm)).await;
    agent.ack(DEST, next).await;
    assert!(repo.ls_tree("main").contains(&format!("c/{fine}")));
    writer.stop().await;
}

/// A snapshot scope names raw Kubernetes names; its folder is theirs in the portable form, where the agent puts the
/// files, so orphans there are swept (namespace `con` lives in `%63on`, a Windows-safe folder).
#[tokio::test]
async fn snapshot_scopes_find_files_in_portable_folders() {
    let repo = BareRepo::new();
    repo.commit_as_human(
        "main",
        "c/core/v1/configmaps/%63on/orphan.yaml",
        &configmap("con", "orphan", "1"),
        "seed",
    );
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let con = || scope("", "v1", "configmaps", "con");
    agent.send(snapshot_begin(DEST, 1, con(), 1)).await;
    agent
        .send(upsert(
            DEST,
            2,
            "core/v1/configmaps/%63on/kept.yaml",
            &configmap("con", "kept", "1"),
        ))
        .await;
    agent.send(snapshot_end(DEST, 3, con(), 1)).await;
    agent.ack(DEST, 3).await;
    let files = repo.ls_tree("main");
    assert!(
        files.contains(&"c/core/v1/configmaps/%63on/kept.yaml".to_owned()),
        "{files:?}"
    );
    assert!(
        !files.contains(&"c/core/v1/configmaps/%63on/orphan.yaml".to_owned()),
        "the orphan in the scope's folder is swept: {files:?}"
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_stream_must_start_with_hello() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = Agent::connect_raw(&writer.grpc_url(), "uid-1").await;
    agent
        .send(upsert(DEST, 1, "core/v1/configmaps/ns/a.yaml", "a: 1\n"))
        .await;
    let reject = agent.reject(0).await;
    assert_eq!(reject.reason, "ProtocolViolation");
    match agent.next().await {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::FailedPrecondition),
        other => panic!("expected the stream to end with an error, got {other:?}"),
    }
    let mut agent = Agent::connect_raw(&writer.grpc_url(), "uid-1").await;
    let mut bad = hello("uid-1");
    if let Some(reverser_proto::v1::agent_message::Kind::Hello(h)) = bad.kind.as_mut() {
        h.protocol_version = 99;
    }
    agent.send(bad).await;
    assert_eq!(agent.reject(0).await.reason, "UnsupportedProtocolVersion");
    drop(repo);
    writer.stop().await;
}

#[tokio::test]
async fn commits_are_authored_by_the_user_who_made_the_change() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--git-batch-max-wait-sec", "1"]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    agent
        .send(upsert_by(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
            "alice@example.com",
        ))
        .await;
    agent
        .send(upsert_by(
            DEST,
            2,
            "core/v1/configmaps/ns/b.yaml",
            &configmap("ns", "b", "1"),
            "bob",
        ))
        .await;
    agent
        .send(upsert(
            DEST,
            3,
            "core/v1/configmaps/ns/c.yaml",
            &configmap("ns", "c", "1"),
        ))
        .await;
    agent.ack(DEST, 3).await;
    let log = testkit::git(
        Some(&repo.path()),
        &["log", "--format=%an <%ae>|%cn <%ce>", "main"],
    );
    let log = String::from_utf8(log.stdout).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec![
            "GitOps Reverser <gitops-reverser@noreply.cluster.local>|GitOps Reverser <gitops-reverser@noreply.cluster.local>",
            "bob <bob@noreply.cluster.local>|GitOps Reverser <gitops-reverser@noreply.cluster.local>",
            "alice@example.com <alice@example.com>|GitOps Reverser <gitops-reverser@noreply.cluster.local>",
        ]
    );
    writer.stop().await;
}

#[tokio::test]
async fn an_unreachable_remote_keeps_changes_pending_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("late.git");
    let url = format!("file://{}", remote.display());
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &url, "main", "c").await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    let failing = agent.status(DEST, "PushFailing").await;
    assert_eq!(failing.status, "True");
    assert!(!failing.message.is_empty());
    let acked = agent.drain_for(Duration::from_millis(300)).await;
    assert!(
        !acked.iter().any(|m| matches!(m, Out::Ack(_))),
        "nothing is acked before it is pushed"
    );

    // The remote appears: the pending change lands without being re-sent.
    testkit::git(None, &["init", "--bare", "-q", remote.to_str().unwrap()]);
    agent.ack(DEST, 1).await;
    let ready = agent.status(DEST, "Ready").await;
    assert_eq!(ready.status, "True");
    let output = testkit::git(
        Some(&remote),
        &["show", "main:c/core/v1/configmaps/ns/a.yaml"],
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        configmap("ns", "a", "1")
    );
    writer.stop().await;
}

#[tokio::test]
async fn wrong_credentials_report_auth_failed_without_leaking_the_password() {
    let repo = BareRepo::new();
    let server = testkit::HttpGitServer::start(&repo, "bot", "right-password");
    let ca = server.ca_file().display().to_string();
    let writer = Writer::start(&["--git-ca-file", &ca]).await;
    let mut agent = writer.agent("uid-1").await;
    let mut message = destination(DEST, &server.url(), "main", "c", false);
    if let Some(reverser_proto::v1::agent_message::Kind::Destination(d)) = message.kind.as_mut() {
        d.credentials = Some(reverser_proto::v1::Credentials {
            kind: Some(reverser_proto::v1::credentials::Kind::Basic(
                reverser_proto::v1::BasicAuth {
                    username: "bot".into(),
                    password: "wrong-password-123".into(),
                },
            )),
        });
    }
    agent.send(message).await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    let status = agent.status(DEST, "AuthFailed").await;
    assert!(
        !status.message.contains("wrong-password-123"),
        "{}",
        status.message
    );
    let metrics = writer.metrics().await;
    assert!(!metrics.contains("wrong-password-123"));
    writer.stop().await;
}

#[tokio::test]
async fn two_destinations_share_one_worker_and_overlapping_ones_are_refused() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut a = writer.agent("uid-a").await;
    let mut b = writer.agent("uid-b").await;
    a.declare(DEST, &repo.file_url(), "main", "clusters/a")
        .await;
    b.declare(DEST, &repo.file_url(), "main", "clusters/b")
        .await;
    b.send(destination(
        "gitops/sneaky",
        &repo.file_url(),
        "main",
        "clusters/a/inner",
        false,
    ))
    .await;
    let refused = b.status("gitops/sneaky", "OwnershipConflict").await;
    assert_eq!(refused.reason, "OverlappingBaseFolder");
    // Another spelling of the same repository (a trailing `/`) is the same repository: refused too.
    b.send(destination(
        "gitops/sneakier",
        &format!("{}/", repo.file_url()),
        "main",
        "clusters/a/inner",
        false,
    ))
    .await;
    let refused = b.status("gitops/sneakier", "OwnershipConflict").await;
    assert_eq!(refused.reason, "OverlappingBaseFolder");
    a.send(upsert(
        DEST,
        1,
        "core/v1/configmaps/ns/x.yaml",
        &configmap("ns", "x", "a"),
    ))
    .await;
    b.send(upsert(
        DEST,
        1,
        "core/v1/configmaps/ns/x.yaml",
        &configmap("ns", "x", "b"),
    ))
    .await;
    a.ack(DEST, 1).await;
    b.ack(DEST, 1).await;
    assert_eq!(
        repo.read("main", "clusters/a/core/v1/configmaps/ns/x.yaml")
            .unwrap(),
        configmap("ns", "x", "a")
    );
    assert_eq!(
        repo.read("main", "clusters/b/core/v1/configmaps/ns/x.yaml")
            .unwrap(),
        configmap("ns", "x", "b")
    );
    writer.stop().await;
}

#[tokio::test]
async fn half_closing_the_stream_flushes_and_ends_it() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--git-batch-max-wait-sec", "600"]).await;
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
    agent.finish();
    agent.ack(DEST, 1).await;
    loop {
        match agent.next().await {
            None => break,
            Some(Ok(_)) => continue,
            Some(Err(status)) => panic!("the stream must end cleanly, got {status}"),
        }
    }
    assert!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml")
            .is_some()
    );
    writer.stop().await;
}

/// A burst of messages is read and checked in runs, several at once: what comes back still follows the stream's
/// order, every bad message is refused alone, and a half-close right behind the burst ends the stream after all of
/// it.
#[tokio::test]
async fn a_burst_is_answered_in_stream_order_and_a_half_close_behind_it_ends_cleanly() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--git-batch-max-wait-sec", "600"]).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &repo.file_url(), "main", "c").await;
    let count = 300u64;
    let bad = |sequence: u64| sequence % 10 == 3;
    let sender = agent.sender();
    let burst = tokio::spawn(async move {
        for sequence in 1..=count {
            let name = format!("cm-{sequence}");
            let content = if bad(sequence) {
                "apiVersion: v1\nkind: [\n".to_owned()
            } else {
                configmap("ns", &name, "1")
            };
            let path = format!("core/v1/configmaps/ns/{name}.yaml");
            sender
                .send(upsert(DEST, sequence, &path, &content))
                .await
                .expect("stream open");
        }
    });
    burst.await.unwrap();
    agent.finish();
    let mut refused = Vec::new();
    let mut acked = 0;
    loop {
        match agent.next().await {
            None => break,
            Some(Ok(Out::Reject(reject))) => {
                assert_eq!(reject.reason, "InvalidYaml", "{}", reject.message);
                refused.push(reject.sequence);
            }
            Some(Ok(Out::Ack(ack))) => acked = acked.max(ack.sequence),
            Some(Ok(_)) => {}
            Some(Err(status)) => panic!("the stream must end cleanly, got {status}"),
        }
    }
    let expected: Vec<u64> = (1..=count).filter(|&s| bad(s)).collect();
    assert_eq!(refused, expected, "refused in stream order, each once");
    assert!(
        acked >= count - 1,
        "the last good change is acked ({acked})"
    );
    let files = repo.ls_tree("main");
    for sequence in 1..=count {
        let path = format!("c/core/v1/configmaps/ns/cm-{sequence}.yaml");
        assert_eq!(
            files.contains(&path),
            !bad(sequence),
            "{path} is in the remote exactly when its message was good"
        );
    }
    writer.stop().await;
}

#[tokio::test]
async fn plaintext_on_a_public_address_is_refused_without_the_flag() {
    use clap::Parser;
    let work = tempfile::tempdir().unwrap();
    let args = reverser_writer::Args::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "0.0.0.0:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        work.path().to_str().unwrap(),
        "--leases",
        "off",
    ])
    .unwrap();
    let error = args.start().await.err().expect("refused").to_string();
    assert!(error.contains("refusing to serve plaintext"), "{error}");
}

#[tokio::test]
async fn worker_caps_refuse_destinations_beyond_them() {
    let repo = BareRepo::new();
    let other = BareRepo::new();
    let writer = Writer::start(&["--workers-max-per-repo", "1", "--workers-max-global", "2"]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare("gitops/main", &repo.file_url(), "main", "a")
        .await;
    agent
        .send(destination(
            "gitops/second-branch",
            &repo.file_url(),
            "staging",
            "a",
            false,
        ))
        .await;
    let refused = agent.status("gitops/second-branch", "Ready").await;
    assert_eq!(
        (refused.status.as_str(), refused.reason.as_str()),
        ("False", "WorkerLimitReached"),
        "{}",
        refused.message
    );
    agent
        .declare("gitops/other-repo", &other.file_url(), "main", "a")
        .await;
    let third = BareRepo::new();
    agent
        .send(destination(
            "gitops/third-repo",
            &third.file_url(),
            "main",
            "a",
            false,
        ))
        .await;
    let refused = agent.status("gitops/third-repo", "Ready").await;
    assert_eq!(refused.reason, "WorkerLimitReached", "{}", refused.message);
    writer.stop().await;
}

#[tokio::test]
async fn a_second_writer_on_the_same_work_dir_is_refused() {
    use clap::Parser;
    let writer = Writer::start(&[]).await;
    let work = writer.work_dir.path().display().to_string();
    let args = reverser_writer::Args::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--leases",
        "off",
    ])
    .unwrap();
    let error = args.start().await.err().expect("refused").to_string();
    assert!(
        error.contains("another reverser-writer is using --work-dir"),
        "{error}"
    );
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_file_applies_to_the_running_worker_without_a_restart() {
    let repo = BareRepo::new();
    let server = HttpGitServer::start(&repo, "bot", "new-password-456");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "old-password-123\n").unwrap();
    let credentials = dir.path().join("credentials.yaml");
    std::fs::write(
        &credentials,
        format!(
            "credentials:\n  - urlPrefix: {}\n    username: bot\n    passwordFile: {}\n",
            server.url(),
            password.display()
        ),
    )
    .unwrap();
    let ca = server.ca_file().display().to_string();
    let writer = Writer::start(&[
        "--git-ca-file",
        &ca,
        "--git-credentials",
        credentials.to_str().unwrap(),
        "--reload-interval-sec",
        "0.2",
    ])
    .await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &server.url(), "main", "c").await;
    agent
        .send(upsert(
            DEST,
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.status(DEST, "AuthFailed").await;
    assert_eq!(repo.rev_parse("main"), None);

    // Only the password file changes (the credentials file stays as it is): the worker gets the new password
    // and pushes without a restart and without waiting out its backoff.
    std::fs::write(&password, "new-password-456\n").unwrap();
    agent.ack(DEST, 1).await;
    assert_eq!(
        repo.read("main", "c/core/v1/configmaps/ns/a.yaml").unwrap(),
        configmap("ns", "a", "1")
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_path_conflict_is_rejected_alone_and_the_rest_of_the_batch_lands() {
    let repo = BareRepo::new();
    // A person made `c/h/x.yaml` a folder.
    repo.commit_as_human(
        "main",
        "c/h/x.yaml/notes.yaml",
        "by: hand\n",
        "human folder",
    );
    let writer = Writer::start(&["--git-batch-max-wait-sec", "1"]).await;
    let mut a = writer.agent("uid-a").await;
    let mut b = writer.agent("uid-b").await;
    a.declare(DEST, &repo.file_url(), "main", "c").await;
    // Another client on the same branch (the same worker) must not be held back or told about A's paths.
    b.declare("gitops/other", &repo.file_url(), "main", "d")
        .await;
    let cm = configmap("ns", "x", "1");
    a.send(upsert(DEST, 1, "a/x.yaml", &cm)).await;
    // A file under a pending file, then a file where the human's folder is.
    a.send(upsert(DEST, 2, "a/x.yaml/y.yaml", &cm)).await;
    a.send(upsert(DEST, 3, "h/x.yaml", &cm)).await;
    b.send(upsert("gitops/other", 1, "b/ok.yaml", &cm)).await;
    a.send(upsert(DEST, 4, "a/z.yaml", &cm)).await;

    for sequence in [2, 3] {
        let reject = a.reject(sequence).await;
        assert_eq!(reject.reason, "PathConflict", "{reject:?}");
    }
    a.ack(DEST, 4).await;
    b.ack("gitops/other", 1).await;
    for path in [
        "c/a/x.yaml",
        "c/a/z.yaml",
        "d/b/ok.yaml",
        "c/h/x.yaml/notes.yaml",
    ] {
        assert!(repo.read("main", path).is_some(), "{path} missing");
    }
    assert!(repo.read("main", "c/a/x.yaml/y.yaml").is_none());
    // Nothing failed: B saw no failure and none of A's paths.
    for out in b.drain_for(Duration::from_millis(300)).await {
        let text = format!("{out:?}");
        assert!(
            !text.contains("x.yaml") && !text.contains("PushFailing"),
            "{text}"
        );
    }
    // The worker is not poisoned: the next change lands too.
    a.send(upsert(DEST, 5, "a/w.yaml", &cm)).await;
    a.ack(DEST, 5).await;
    writer.stop().await;
}

#[tokio::test]
async fn prune_modes_decide_which_deletions_land_and_a_redeclaration_switches_them() {
    const KEPT: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kept, namespace: shop}\n";
    let repo = BareRepo::new();
    for name in ["kept", "orphan", "gone", "later"] {
        repo.commit_as_human(
            "main",
            &format!("c/core/v1/configmaps/shop/{name}.yaml"),
            "a: 1\n",
            "seed",
        );
    }
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    let declare = |prune: pb::PruneMode| {
        let mut message = destination(DEST, &repo.file_url(), "main", "c", false);
        if let Some(pb::agent_message::Kind::Destination(d)) = &mut message.kind {
            d.prune = prune.into();
        }
        message
    };
    let configmaps = || scope("", "v1", "configmaps", "");
    let file = |name: &str| format!("c/core/v1/configmaps/shop/{name}.yaml");
    let has = |name: &str| repo.ls_tree("main").contains(&file(name));

    // Never: neither the delete nor the snapshot removes anything.
    agent.send(declare(pb::PruneMode::Never)).await;
    agent
        .send(delete(DEST, 1, "core/v1/configmaps/shop/gone.yaml"))
        .await;
    agent.send(snapshot_begin(DEST, 2, configmaps(), 1)).await;
    agent
        .send(upsert(DEST, 3, "core/v1/configmaps/shop/kept.yaml", KEPT))
        .await;
    agent.send(snapshot_end(DEST, 4, configmaps(), 1)).await;
    agent.ack(DEST, 4).await;
    assert!(has("gone") && has("orphan") && has("later"));
    assert_eq!(
        repo.read("main", &file("kept")).as_deref(),
        Some(KEPT),
        "writes still land"
    );

    // OnDelete: the delete lands, the snapshot still deletes nothing.
    agent.send(declare(pb::PruneMode::OnDelete)).await;
    agent
        .send(delete(DEST, 5, "core/v1/configmaps/shop/gone.yaml"))
        .await;
    agent.send(snapshot_begin(DEST, 6, configmaps(), 2)).await;
    agent
        .send(upsert(DEST, 7, "core/v1/configmaps/shop/kept.yaml", KEPT))
        .await;
    agent.send(snapshot_end(DEST, 8, configmaps(), 2)).await;
    agent.ack(DEST, 8).await;
    assert!(!has("gone"), "the observed delete lands");
    assert!(has("orphan") && has("later"), "no sweep under OnDelete");

    // OnSnapshot (also what an agent that sends no mode gets): the next complete snapshot sweeps.
    agent.send(declare(pb::PruneMode::Unspecified)).await;
    agent.send(snapshot_begin(DEST, 9, configmaps(), 3)).await;
    agent
        .send(upsert(DEST, 10, "core/v1/configmaps/shop/kept.yaml", KEPT))
        .await;
    agent.send(snapshot_end(DEST, 11, configmaps(), 3)).await;
    agent.ack(DEST, 11).await;
    assert!(
        !has("orphan") && !has("later"),
        "{:?}",
        repo.ls_tree("main")
    );
    assert!(has("kept"));

    // A mode this writer does not know is refused, never treated as a looser one.
    let mut unknown = declare(pb::PruneMode::Never);
    if let Some(pb::agent_message::Kind::Destination(d)) = &mut unknown.kind {
        d.key = "gitops/newer".into();
        d.base_folder = "newer".into();
        d.prune = 42;
    }
    agent.send(unknown).await;
    let refused = agent.reject(0).await;
    assert_eq!(refused.reason, "InvalidDestination");
    assert!(refused.message.contains("prune mode 42"), "{refused:?}");
    let ready = agent.status("gitops/newer", "Ready").await;
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidDestination")
    );
    writer.stop().await;
}

#[tokio::test]
async fn an_agent_that_stops_reading_its_replies_is_ended_and_the_worker_keeps_serving_the_others()
{
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;

    // The slow agent shares the worker (same repository and branch) and has a change of its own in it, so the
    // worker answers it too. Then it floods the stream with messages that each earn a Reject and reads nothing.
    let mut slow = writer.agent("uid-slow").await;
    slow.declare("gitops/slow", &repo.file_url(), "main", "slow")
        .await;
    slow.send(upsert(
        "gitops/slow",
        1,
        "core/v1/configmaps/ns/a.yaml",
        &configmap("ns", "a", "1"),
    ))
    .await;
    let sender = slow.sender();
    let flood = tokio::spawn(async move {
        // Far more replies than the writer queues per stream plus what HTTP/2 buffers. The writer stops reading
        // once it ends the stream, so this send may wait for good: the task is aborted at the end.
        for sequence in 1..=60_000u64 {
            let message = upsert(
                "gitops/undeclared",
                sequence,
                "core/v1/configmaps/ns/x.yaml",
                "x",
            );
            if sender.send(message).await.is_err() {
                break;
            }
        }
    });

    // The writer notices the full reply queue and ends the slow stream.
    let mut polls = 0;
    while !writer
        .metrics()
        .await
        .contains("gitops_reverser_slow_streams_ended_total 1")
    {
        polls += 1;
        assert!(polls < 600, "the slow stream was never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A reading agent on the same worker (which still holds the slow stream's full reply queue) gets every ack.
    let mut reader = writer.agent("uid-reader").await;
    reader
        .declare("gitops/reader", &repo.file_url(), "main", "reader")
        .await;
    let mut written = Vec::new();
    for round in 1..=3u64 {
        let path = format!("core/v1/configmaps/ns/r{round}.yaml");
        reader
            .send(upsert(
                "gitops/reader",
                round,
                &path,
                &configmap("ns", "r", &round.to_string()),
            ))
            .await;
        let sha = reader.ack("gitops/reader", round).await;
        assert_eq!(repo.rev_parse("main").as_deref(), Some(sha.as_str()));
        written.push(path);
    }

    // The slow stream ends with RESOURCE_EXHAUSTED, which its agent sees after the replies queued before it.
    let mut replies_before_the_end = 0usize;
    let status = loop {
        match slow.next().await {
            Some(Ok(_)) => replies_before_the_end += 1,
            Some(Err(status)) => break status,
            None => panic!(
                "the slow stream ended without a status after {replies_before_the_end} replies"
            ),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("did not read its replies"),
        "{status}"
    );
    let metrics = writer.metrics().await;
    assert!(
        metrics.contains("gitops_reverser_slow_streams_ended_total 1"),
        "{metrics}"
    );
    flood.abort();

    // Nothing of the reading agent was lost, and the worker still serves new streams.
    for (round, path) in written.iter().enumerate() {
        assert_eq!(
            repo.read("main", &format!("reader/{path}")).unwrap(),
            configmap("ns", "r", &(round + 1).to_string())
        );
    }
    reader
        .send(upsert(
            "gitops/reader",
            4,
            "core/v1/configmaps/ns/r4.yaml",
            &configmap("ns", "r", "4"),
        ))
        .await;
    reader.ack("gitops/reader", 4).await;
    writer.stop().await;
}
