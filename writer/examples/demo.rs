//! The writer's main job on an embedded default: no cluster, no remote Git server.
//!
//! Creates a bare repository in a temporary directory (or `DEMO_DIR`), starts the real writer in this process,
//! and plays the part of an agent over the real gRPC protocol: a first snapshot of a small sample cluster, then a
//! scale-up, a user's edit, a delete, and a second snapshot that finds an orphan. Prints `git log --stat` and the
//! resulting tree.
//!
//! Run: `cargo run -p reverser-writer --example demo`

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use reverser_proto::v1::{
    self as pb, agent_message::Kind as In, writer_client::WriterClient, writer_message::Kind as Out,
};

const DEST: &str = "gitops-reverser/demo";

fn deployment(ns: &str, name: &str, replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  labels:\n    app: {name}\n  name: {name}\n  namespace: {ns}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n      - image: {image}\n        name: {name}\n"
    )
}

fn service(ns: &str, name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  ports:\n  - port: {port}\n    protocol: TCP\n    targetPort: {port}\n  selector:\n    app: {name}\n"
    )
}

fn configmap(ns: &str, name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  {key}: {value:?}\n"
    )
}

fn cluster_role(name: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {name}\nrules:\n- apiGroups:\n  - apps\n  resources:\n  - deployments\n  verbs:\n  - get\n  - list\n"
    )
}

struct Stream {
    sender: mpsc::Sender<pb::AgentMessage>,
    replies: tonic::Streaming<pb::WriterMessage>,
    sequence: u64,
}

impl Stream {
    async fn send(&mut self, kind: In) -> anyhow::Result<()> {
        self.sender
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .context("stream closed")
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    async fn upsert(&mut self, path: &str, yaml: String, author: &str) -> anyhow::Result<()> {
        let sequence = self.next_sequence();
        self.send(In::Upsert(pb::Upsert {
            sequence,
            destination: DEST.into(),
            path: path.into(),
            content: yaml.into_bytes(),
            author: author.into(),
            ..Default::default()
        }))
        .await
    }

    async fn delete(&mut self, path: &str, author: &str) -> anyhow::Result<()> {
        let sequence = self.next_sequence();
        self.send(In::Delete(pb::Delete {
            sequence,
            destination: DEST.into(),
            path: path.into(),
            author: author.into(),
            ..Default::default()
        }))
        .await
    }

    async fn snapshot(
        &mut self,
        begin: bool,
        group: &str,
        resource: &str,
        epoch: u64,
    ) -> anyhow::Result<()> {
        let sequence = self.next_sequence();
        let scope = Some(pb::SnapshotScope {
            group: group.into(),
            version: "v1".into(),
            resource: resource.into(),
            namespace: String::new(),
        });
        let kind = if begin {
            In::SnapshotBegin(pb::SnapshotBegin {
                sequence,
                destination: DEST.into(),
                scope,
                epoch,
            })
        } else {
            In::SnapshotEnd(pb::SnapshotEnd {
                sequence,
                destination: DEST.into(),
                scope,
                epoch,
            })
        };
        self.send(kind).await
    }

    /// Waits until everything sent so far is pushed; prints rejects and statuses on the way.
    async fn wait_pushed(&mut self) -> anyhow::Result<String> {
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(60), self.replies.message())
                .await
                .context("no reply within 60 s")??
                .context("the writer ended the stream")?;
            match reply.kind {
                Some(Out::Ack(ack)) if ack.sequence >= self.sequence => return Ok(ack.commit_sha),
                Some(Out::Reject(reject)) => {
                    bail!("rejected: {} {}", reject.reason, reject.message)
                }
                Some(Out::DestinationStatus(status)) => {
                    println!(
                        "  status: {} {} ({}) {}",
                        status.r#type, status.status, status.reason, status.message
                    )
                }
                _ => {}
            }
        }
    }
}

fn git(dir: &PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .context("running git")?;
    if !output.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _temp;
    let root = match std::env::var_os("DEMO_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            _temp = tempfile::tempdir()?;
            _temp.path().to_path_buf()
        }
    };
    let remote = root.join("remote.git");
    std::fs::create_dir_all(&remote)?;
    git(&remote, &["init", "--bare", "-q", "--initial-branch=main"])?;
    let work_dir = root.join("writer-work");
    let url = format!("file://{}", remote.display());
    println!(
        "== gitops-reverser writer demo\n  remote:   {url}\n  work dir: {}",
        work_dir.display()
    );

    let args = reverser_writer::Args::try_parse_from([
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        work_dir.to_str().context("work dir path")?,
        "--git-batch-max-wait-sec",
        "0.5",
        "--leases",
        "off",
        "--log-level",
        "warn",
    ])?;
    let writer = args.start().await?;
    let mut client = WriterClient::connect(format!("http://{}", writer.grpc_addr)).await?;
    let (sender, receiver) = mpsc::channel(256);
    let replies = client
        .sync(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let mut stream = Stream {
        sender,
        replies,
        sequence: 0,
    };
    stream
        .send(In::Hello(pb::Hello {
            cluster_uid: "3f1e6c2a-demo".into(),
            cluster_name: "demo".into(),
            instance_id: "reverser-agent-0".into(),
            controller_namespace: "gitops-reverser".into(),
            controller_name: "gitops-reverser".into(),
            protocol_version: reverser_proto::PROTOCOL_VERSION,
            leader_term: None,
        }))
        .await?;
    stream
        .send(In::Destination(pb::Destination {
            key: DEST.into(),
            repo_url: url.clone(),
            branch: "main".into(),
            base_folder: "clusters/demo".into(),
            exclusive_mode: true,
            credentials: None,
            age_recipients: Vec::new(),
            commit_message: None,
        }))
        .await?;

    println!("\n== 1. first snapshot of the sample cluster");
    stream.snapshot(true, "apps", "deployments", 1).await?;
    stream
        .upsert(
            "apps/v1/deployments/shop/web.yaml",
            deployment("shop", "web", 2, "nginx:1.27"),
            "",
        )
        .await?;
    stream
        .upsert(
            "apps/v1/deployments/shop/api.yaml",
            deployment("shop", "api", 1, "ghcr.io/acme/api:1.4.0"),
            "",
        )
        .await?;
    stream
        .upsert(
            "apps/v1/deployments/billing/invoicer.yaml",
            deployment("billing", "invoicer", 1, "ghcr.io/acme/invoicer:2.0"),
            "",
        )
        .await?;
    stream.snapshot(false, "apps", "deployments", 1).await?;
    stream
        .upsert(
            "core/v1/services/shop/web.yaml",
            service("shop", "web", 80),
            "",
        )
        .await?;
    stream
        .upsert(
            "core/v1/services/shop/api.yaml",
            service("shop", "api", 8080),
            "",
        )
        .await?;
    stream
        .upsert(
            "core/v1/configmaps/shop/settings.yaml",
            configmap("shop", "settings", "checkout", "on"),
            "",
        )
        .await?;
    stream
        .upsert(
            "rbac.authorization.k8s.io/v1/clusterroles/deployment-reader.yaml",
            cluster_role("deployment-reader"),
            "",
        )
        .await?;
    println!("  pushed {}", stream.wait_pushed().await?);

    println!("\n== 2. alice scales web to 5, bob edits a ConfigMap, a Service is deleted");
    stream
        .upsert(
            "apps/v1/deployments/shop/web.yaml",
            deployment("shop", "web", 5, "nginx:1.27"),
            "alice@example.com",
        )
        .await?;
    stream
        .upsert(
            "core/v1/configmaps/shop/settings.yaml",
            configmap("shop", "settings", "checkout", "off"),
            "bob",
        )
        .await?;
    stream.delete("core/v1/services/shop/api.yaml", "").await?;
    println!("  pushed {}", stream.wait_pushed().await?);

    println!("\n== 3. the same state again (a resync): semantic no-op, no commit");
    stream
        .upsert(
            "apps/v1/deployments/shop/web.yaml",
            deployment("shop", "web", 5, "nginx:1.27"),
            "",
        )
        .await?;
    println!("  tip still {}", stream.wait_pushed().await?);

    println!(
        "\n== 4. second snapshot: billing/invoicer was deleted while nobody watched -> orphan removed"
    );
    stream.snapshot(true, "apps", "deployments", 2).await?;
    stream
        .upsert(
            "apps/v1/deployments/shop/web.yaml",
            deployment("shop", "web", 5, "nginx:1.27"),
            "",
        )
        .await?;
    stream
        .upsert(
            "apps/v1/deployments/shop/api.yaml",
            deployment("shop", "api", 1, "ghcr.io/acme/api:1.4.0"),
            "",
        )
        .await?;
    stream.snapshot(false, "apps", "deployments", 2).await?;
    println!("  pushed {}", stream.wait_pushed().await?);

    drop(stream);
    writer.stop().await?;

    println!("\n== git log --stat (remote, branch main)\n");
    print!(
        "{}",
        git(
            &remote,
            &[
                "log",
                "--stat",
                "--format=commit %h%nAuthor: %an <%ae>%n%n%w(0,4,4)%B",
                "main"
            ]
        )?
    );
    println!("\n== tree\n");
    print!(
        "{}",
        git(&remote, &["ls-tree", "-r", "--name-only", "main"])?
    );
    println!("\n== clusters/demo/apps/v1/deployments/shop/web.yaml\n");
    print!(
        "{}",
        git(
            &remote,
            &[
                "show",
                "main:clusters/demo/apps/v1/deployments/shop/web.yaml"
            ]
        )?
    );
    Ok(())
}
