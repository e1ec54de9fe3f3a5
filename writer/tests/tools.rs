//! The writer as people debug and monitor it: grpcurl over server reflection (list, describe, a scripted
//! `Sync` with JSON messages on stdin, the admin service, health) and `promtool check metrics` on /metrics.
//! grpcurl and promtool are installed by scripts/install-test-deps.sh; the tests fail when they are missing.

mod support;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use support::*;
use testkit::BareRepo;

fn grpcurl(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(tool("grpcurl"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run grpcurl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_the_services_through_reflection() {
    let writer = Writer::start(&[]).await;
    let addr = writer.running.as_ref().unwrap().grpc_addr.to_string();
    let target = addr.clone();
    let (ok, stdout, stderr) =
        blocking(move || grpcurl(&["-plaintext", &target, "list"], None)).await;
    assert!(ok, "grpcurl list failed: {stderr}");
    for service in [
        "reverser.v1.Writer",
        "reverser.v1.WriterAdmin",
        "grpc.health.v1.Health",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim() == service),
            "{service} missing from:\n{stdout}"
        );
    }
    let target = addr.clone();
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &["-plaintext", &target, "describe", "reverser.v1.Upsert"],
            None,
        )
    })
    .await;
    assert!(ok, "describe failed: {stderr}");
    assert!(
        stdout.contains("uint64 sequence = 1;") && stdout.contains("bytes content = 4;"),
        "{stdout}"
    );
    assert!(
        stdout.contains("google.protobuf.Timestamp event_time = 8;"),
        "imports resolve: {stdout}"
    );
    let target = addr.clone();
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &[
                "-plaintext",
                "-d",
                r#"{"service":"reverser.v1.Writer"}"#,
                &target,
                "grpc.health.v1.Health/Check",
            ],
            None,
        )
    })
    .await;
    assert!(ok, "health check failed: {stderr}");
    assert!(stdout.contains("SERVING"), "{stdout}");
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_grpcurl_sync_lands_a_commit_and_the_admin_service_shows_it() {
    let repo = BareRepo::new();
    let writer = Writer::start(&["--git-batch-max-wait-sec", "600"]).await;
    let addr = writer.running.as_ref().unwrap().grpc_addr.to_string();
    use base64::Engine;
    let yaml = configmap("shop", "settings", "from-grpcurl");
    let content = base64::engine::general_purpose::STANDARD.encode(yaml.as_bytes());
    let url = repo.file_url();
    // JSON messages on stdin, exactly as the README shows (bytes fields are base64 in proto3 JSON).
    let script = format!(
        r#"{{"hello": {{"clusterUid": "demo-cluster", "instanceId": "grpcurl", "controllerNamespace": "gitops", "controllerName": "reverser", "protocolVersion": 1}}}}
{{"destination": {{"key": "gitops/demo", "repoUrl": "{url}", "branch": "main", "baseFolder": "clusters/demo"}}}}
{{"upsert": {{"sequence": "1", "destination": "gitops/demo", "path": "core/v1/configmaps/shop/settings.yaml", "content": "{content}"}}}}
"#
    );
    let target = addr.clone();
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &["-plaintext", "-d", "@", &target, "reverser.v1.Writer/Sync"],
            Some(&script),
        )
    })
    .await;
    assert!(ok, "grpcurl Sync failed: {stderr}\n{stdout}");
    assert!(stdout.contains("\"welcome\""), "{stdout}");
    assert!(
        stdout.contains("\"ack\"") && stdout.contains("\"commitSha\""),
        "{stdout}"
    );
    assert_eq!(
        repo.read(
            "main",
            "clusters/demo/core/v1/configmaps/shop/settings.yaml"
        )
        .unwrap(),
        yaml
    );

    let target = addr.clone();
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &["-plaintext", &target, "reverser.v1.WriterAdmin/ListWorkers"],
            None,
        )
    })
    .await;
    assert!(ok, "{stderr}");
    let tip = repo.rev_parse("main").unwrap();
    assert!(
        stdout.contains(&tip),
        "ListWorkers shows the last commit {tip}: {stdout}"
    );
    assert!(stdout.contains("demo-cluster/gitops/demo"), "{stdout}");
    let target = addr.clone();
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &[
                "-plaintext",
                &target,
                "reverser.v1.WriterAdmin/ListDestinations",
            ],
            None,
        )
    })
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("\"baseFolder\": \"clusters/demo\"")
            && stdout.contains("\"ackedSequence\": \"1\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"type\": \"Ready\"") && stdout.contains("\"reason\": \"Pushed\""),
        "conditions are listed: {stdout}"
    );
    let target = addr.clone();
    let request = format!(r#"{{"repoUrl": "{url}", "branch": "main"}}"#);
    let (ok, stdout, stderr) = blocking(move || {
        grpcurl(
            &[
                "-plaintext",
                "-d",
                &request,
                &target,
                "reverser.v1.WriterAdmin/Flush",
            ],
            None,
        )
    })
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&tip), "{stdout}");
    let target = addr.clone();
    let (ok, _, stderr) = blocking(move || {
        grpcurl(
            &[
                "-plaintext",
                "-d",
                r#"{"repoUrl": "file:///nope", "branch": "main"}"#,
                &target,
                "reverser.v1.WriterAdmin/Flush",
            ],
            None,
        )
    })
    .await;
    assert!(!ok && stderr.contains("NotFound"), "{stderr}");
    writer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_exposition() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare("gitops/prod", &repo.file_url(), "main", "c")
        .await;
    agent
        .send(upsert(
            "gitops/prod",
            1,
            "core/v1/configmaps/ns/a.yaml",
            &configmap("ns", "a", "1"),
        ))
        .await;
    agent.ack("gitops/prod", 1).await;
    let metrics = writer.metrics().await;
    for name in [
        "gitops_reverser_objects_written_total",
        "gitops_reverser_commits_total",
        "gitops_reverser_commit_bytes_total",
        "gitops_reverser_commit_batches_total",
        "gitops_reverser_repo_branch_active_workers",
        "gitops_reverser_repo_branch_queue_depth",
        "gitops_reverser_messages_received_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let promtool = tool("promtool");
    let output = blocking(move || {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await;
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let health = http_get(&format!("{}/healthz", writer.admin_url())).await;
    assert_eq!(health, "ok\n");
    let ready = http_get(&format!("{}/readyz", writer.admin_url())).await;
    assert_eq!(ready, "ready\n");
    writer.stop().await;
}
