//! Commit message templates over the real protocol, read back with the git CLI: a destination's template shapes
//! subject and body, the trailers stay, and a bad template is refused when the destination is declared.

mod support;

use reverser_proto::v1::{self as pb, agent_message::Kind as In, writer_message::Kind as Out};
use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";

fn templated(key: &str, repo_url: &str, subject: &str, body: &str) -> pb::AgentMessage {
    let mut message = destination(key, repo_url, "main", "clusters/prod", false);
    if let Some(In::Destination(d)) = &mut message.kind {
        d.commit_message = Some(pb::CommitMessageTemplate {
            subject: subject.into(),
            body: body.into(),
        });
    }
    message
}

#[tokio::test]
async fn a_destination_template_shapes_the_message_and_the_trailers_stay() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .send(templated(
            DEST,
            &repo.file_url(),
            "{operation}({kind}): {namespace}/{name}",
            "by {author}\n\n{objects}",
        ))
        .await;
    agent
        .expect(
            |m| matches!(m, Out::DestinationStatus(s) if s.destination == DEST && s.r#type == "Accepted"),
            "accepted",
        )
        .await;
    agent
        .send(upsert_by(
            DEST,
            1,
            "core/v1/configmaps/shop/settings.yaml",
            &configmap("shop", "settings", "1"),
            "alice@example.com",
        ))
        .await;
    agent.ack(DEST, 1).await;
    let message = repo.tip_message("main");
    assert!(
        message.starts_with(
            "create(ConfigMap): shop/settings\n\nby alice@example.com\n\n[CREATE] core/v1/configmaps/shop/settings\n\n"
        ),
        "{message}"
    );
    let trailers = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.path())
        .args([
            "log",
            "-1",
            "--format=%(trailers:key=X-ConfigButler-ClusterUID,valueonly)",
            "main",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&trailers.stdout).trim(),
        "uid-1",
        "{message}"
    );
    writer.stop().await;
}

#[tokio::test]
async fn a_bad_template_is_refused_at_declaration_and_nothing_is_written() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    for (key, subject, body, expected) in [
        (
            "gitops/unknown",
            "{operation} {knd}",
            "",
            "unknown field \"knd\"",
        ),
        ("gitops/open", "{operation", "", "not closed"),
        ("gitops/empty", "", "{objects}", "subject is required"),
        ("gitops/lines", "a\nb", "", "one line"),
        ("gitops/objects", "{objects}", "", "use it in the body"),
    ] {
        agent
            .send(templated(key, &repo.file_url(), subject, body))
            .await;
        let reject = agent
            .expect(|m| matches!(m, Out::Reject(r) if r.destination == key), key)
            .await;
        let Out::Reject(reject) = reject else {
            unreachable!()
        };
        assert_eq!(
            reject.reason, "InvalidDestination",
            "{key}: {}",
            reject.message
        );
        assert!(
            reject.message.contains(expected),
            "{key}: {}",
            reject.message
        );
    }
    assert!(repo.rev_parse("main").is_none(), "nothing was written");
    writer.stop().await;
}
