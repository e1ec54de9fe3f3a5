//! A Git remote that accepts TCP connections and never answers must not hang its worker, the other
//! repositories, or the shutdown.

mod support;

use std::{
    net::TcpListener,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use support::*;

/// A TCP server on 127.0.0.1 that accepts every connection and never sends a byte; returns its port.
fn silent_remote() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

const PATH: &str = "core/v1/configmaps/ns/a.yaml";

#[tokio::test]
async fn a_silent_remote_reports_push_failing_while_other_repositories_keep_working() {
    let port = silent_remote();
    let writer = Writer::start(&["--git-io-timeout-sec", "3"]).await;
    let mut agent = writer.agent("uid-1").await;
    let hung = [
        ("gitops/http", format!("http://127.0.0.1:{port}/repo.git")),
        ("gitops/git", format!("git://127.0.0.1:{port}/repo.git")),
    ];
    agent
        .declare_stalled_beside_a_healthy_one(&hung, PATH)
        .await;
    agent.expect_remote_unreachable(&hung).await;
    tokio::time::timeout(Duration::from_secs(10), writer.stop())
        .await
        .expect("the writer stops within 10 s");
}

/// Starts the real binary with a socket timeout far beyond the test, so only the shutdown bound can end it.
async fn start_binary(
    work_dir: &Path,
    log: &Path,
) -> (tokio::process::Child, std::net::SocketAddr) {
    let out = std::fs::File::create(log).expect("create log");
    let err = out.try_clone().expect("clone log handle");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_reverser-writer"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--work-dir",
            work_dir.to_str().expect("utf-8 work dir"),
            "--leases",
            "off",
            "--git-batch-max-wait-sec",
            "0.05",
            "--git-io-timeout-sec",
            "600",
            "--log-format",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn reverser-writer");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("poll writer") {
            panic!("the writer exited ({status}) before listening");
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let listening = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == "writer listening")
            .and_then(|line| line["grpc_addr"].as_str()?.parse().ok());
        if let Some(grpc) = listening {
            return (child, grpc);
        }
        assert!(
            Instant::now() < deadline,
            "the writer does not listen:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_ends_the_writer_while_a_remote_hangs_and_nothing_unpushed_is_acked() {
    let port = silent_remote();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("writer.log");
    let (mut child, grpc) = start_binary(&dir.path().join("work"), &log).await;
    let mut agent = Agent::connect(&format!("http://{grpc}"), "uid-1").await;
    let dest = "gitops/http";
    agent
        .declare(
            dest,
            &format!("http://127.0.0.1:{port}/repo.git"),
            "main",
            "c",
        )
        .await;
    agent
        .send(upsert(dest, 1, PATH, &configmap("ns", "a", "1")))
        .await;
    // Let the worker reach the remote (its first fetch hangs from the start).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let exited = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let status = exited
        .unwrap_or_else(|_| panic!("SIGTERM did not end the writer within 10 s:\n{text}"))
        .expect("reap");
    assert!(status.success(), "{status}:\n{text}");
    // The change was never pushed, so never acked: the agent keeps it and re-sends it to the next writer.
    let replies = agent.drain_for(Duration::from_millis(200)).await;
    assert!(
        !replies
            .iter()
            .any(|m| matches!(m, reverser_proto::v1::writer_message::Kind::Ack(a) if a.destination == dest)),
        "{replies:?}"
    );
}
