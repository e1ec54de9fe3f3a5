//! A file a person commented and reordered keeps its comments and order when the mirrored object changes: the
//! writer edits it in place (real gRPC, real git, the commit inspected with `git diff`).

mod support;

use support::*;
use testkit::BareRepo;

const DEST: &str = "gitops/prod";
const PATH: &str = "apps/v1/deployments/shop/backend.yaml";
const FILE: &str = "clusters/prod/apps/v1/deployments/shop/backend.yaml";

/// The canonical rendering of the Deployment, with `replicas` and the LOG_LEVEL value.
fn deployment(replicas: u32, log_level: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  labels:
    app: backend
  name: backend
  namespace: shop
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: backend
  template:
    metadata:
      labels:
        app: backend
    spec:
      containers:
      - env:
        - name: LOG_LEVEL
          value: {log_level}
        image: registry.example.com/backend:1.4
        name: app
      - image: registry.example.com/shipper:2.0
        name: shipper
"
    )
}

/// What a person pushed: the same object, commented, with `name` first and `spec` before `metadata`.
const COMMENTED: &str = "# Shop backend; ask #payments before scaling down.
apiVersion: apps/v1
kind: Deployment
spec:
  replicas: 2 # the HPA takes over in prod
  selector:
    matchLabels:
      app: backend
  template:
    metadata:
      labels:
        app: backend
    spec:
      containers:
        # the application
        - name: app
          image: registry.example.com/backend:1.4 # pinned
          env:
            - name: LOG_LEVEL
              value: info # debug only in staging
        # log shipper, to be replaced by the node agent
        - name: shipper
          image: registry.example.com/shipper:2.0
metadata:
  name: backend
  namespace: shop
  labels:
    app: backend
";

#[tokio::test]
async fn a_commented_file_keeps_its_comments_and_only_the_changed_lines_change() {
    let repo = BareRepo::new();
    let writer = Writer::start(&[]).await;
    let mut agent = writer.agent("uid-1").await;
    agent
        .declare(DEST, &repo.file_url(), "main", "clusters/prod")
        .await;
    agent
        .send(upsert(DEST, 1, PATH, &deployment(2, "info")))
        .await;
    agent.ack(DEST, 1).await;

    // A person comments the file behind the writer's back: no semantic change.
    let human = repo.commit_as_human("main", FILE, COMMENTED, "backend: explain the settings");

    // The object changes in the cluster. The writer's push is rejected, it fetches and replays over the person's
    // commit: the edit is made against the commented file.
    agent
        .send(upsert(DEST, 2, PATH, &deployment(3, "debug")))
        .await;
    let sha = agent.ack(DEST, 2).await;

    assert_eq!(
        git_stdout(&repo, &["rev-parse", &format!("{sha}~1")]).trim(),
        human,
        "the writer's commit follows the person's"
    );
    let diff = git_stdout(
        &repo,
        &[
            "diff",
            "--unified=0",
            "--no-color",
            &format!("{sha}~1"),
            &sha,
        ],
    );
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| {
            (l.starts_with('+') || l.starts_with('-'))
                && !l.starts_with("+++")
                && !l.starts_with("---")
        })
        .collect();
    assert_eq!(
        changed,
        [
            "-  replicas: 2 # the HPA takes over in prod",
            "+  replicas: 3 # the HPA takes over in prod",
            "-              value: info # debug only in staging",
            "+              value: debug # debug only in staging",
        ],
        "{diff}"
    );
    assert_eq!(
        repo.read("main", FILE).unwrap(),
        COMMENTED
            .replace("replicas: 2", "replicas: 3")
            .replace("value: info", "value: debug")
    );
    let metrics = writer.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("gitops_reverser_yaml_edit_fallbacks_total{")),
        "{metrics}"
    );

    // A person turns the file into something the editor leaves alone (an anchor): the next change rewrites it
    // whole and the fallback is counted by reason.
    let anchored = COMMENTED.replace("app: backend\n  template", "app: &app backend\n  template");
    let anchored = anchored.replace(
        "      labels:\n        app: backend\n    spec",
        "      labels:\n        app: *app\n    spec",
    );
    repo.commit_as_human("main", FILE, &anchored, "backend: share the label");
    agent
        .send(upsert(DEST, 3, PATH, &deployment(4, "debug")))
        .await;
    agent.ack(DEST, 3).await;
    assert_eq!(repo.read("main", FILE).unwrap(), deployment(4, "debug"));
    let metrics = writer.metrics().await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("gitops_reverser_yaml_edit_fallbacks_total{")
                && l.contains("reason=\"anchor_or_tag\"")
                && l.ends_with(" 1")
        ),
        "{metrics}"
    );
    // The exposition with the new family stays valid for Prometheus.
    let promtool = tool("promtool");
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
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
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    writer.stop().await;
}

fn git_stdout(repo: &BareRepo, args: &[&str]) -> String {
    let out = testkit::git(Some(&repo.path()), args);
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
