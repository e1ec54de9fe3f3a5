//! An SSH remote that accepts the connection and then stalls (before, during or after the SSH handshake) must
//! not hang its worker, the other repositories or the shutdown: its destination reports `PushFailing`, its
//! changes stay pending, and they land once the remote answers again. The same holds for a server that keeps a
//! push alive without progress (git's keep-alive packets while a hook hangs), over SSH and HTTPS alike.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use support::*;
use testkit::{BareRepo, SshGitServer};

const PATH: &str = "core/v1/configmaps/ns/a.yaml";

/// The writer's Git deadlines are process-wide (the first writer started in a process sets them), so every test
/// of this file uses the same: a socket that says nothing for 3 s fails, and no fetch or push lasts beyond 8 s.
const DEADLINES: [&str; 4] = [
    "--git-io-timeout-sec",
    "3",
    "--git-operation-timeout-sec",
    "8",
];

async fn start_writer(credentials: &str, extra: &[&str]) -> Writer {
    let mut flags = DEADLINES.to_vec();
    flags.extend(["--git-credentials", credentials]);
    flags.extend_from_slice(extra);
    Writer::start(&flags).await
}

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

/// A TCP proxy in front of `target` that passes the server's SSH identification line to the client and then
/// stops forwarding in both directions (keeping the connections open): a server that froze mid-handshake.
fn freezing_proxy(target: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                let mut byte = [0u8; 1];
                let mut banner = Vec::new();
                while !banner.ends_with(b"\n") && server.read_exact(&mut byte).is_ok() {
                    banner.push(byte[0]);
                }
                let mut client = client;
                let _ = client.write_all(&banner);
                // Read what the client sends (so its writes never block) and answer nothing.
                let mut sink = [0u8; 4096];
                while matches!(client.read(&mut sink), Ok(n) if n > 0) {}
                drop(server);
            });
        }
    });
    port
}

/// A `--git-credentials` file for `url_prefix` with the server's client key and a known_hosts line for
/// `[127.0.0.1]:port` carrying the server's host key.
fn credentials_file(dir: &Path, server: &SshGitServer, url_prefix: &str, port: u16) -> String {
    let key = dir.join("id_ed25519");
    std::fs::write(&key, server.client_private_key()).expect("write key");
    let host_key = server
        .known_hosts()
        .split_once(' ')
        .map(|(_, key)| key.to_owned())
        .expect("known_hosts line");
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key}")).expect("write");
    let file = dir.join("credentials.yaml");
    std::fs::write(
        &file,
        format!(
            "credentials:\n  - urlPrefix: {url_prefix}\n    username: {}\n    sshPrivateKeyFile: {}\n    knownHostsFile: {}\n",
            server.user(),
            key.display(),
            known_hosts.display()
        ),
    )
    .expect("write credentials");
    file.display().to_string()
}

fn ssh_url(server: &SshGitServer, port: u16, repo: &BareRepo) -> String {
    format!(
        "ssh://{}@127.0.0.1:{port}{}",
        server.user(),
        repo.path().display()
    )
}

#[tokio::test]
async fn ssh_remotes_that_stall_before_or_during_the_handshake_report_push_failing_and_the_writer_stops()
 {
    let served = BareRepo::new();
    let server = SshGitServer::start(&served);
    let silent = silent_remote();
    let frozen = freezing_proxy(server.port());
    let dir = tempfile::tempdir().unwrap();
    let silent_dir = dir.path().join("silent");
    let frozen_dir = dir.path().join("frozen");
    std::fs::create_dir_all(&silent_dir).unwrap();
    std::fs::create_dir_all(&frozen_dir).unwrap();
    let silent_url = ssh_url(&server, silent, &served);
    let frozen_url = ssh_url(&server, frozen, &served);
    // One credentials file with both entries (the prefixes differ by port).
    let a = credentials_file(&silent_dir, &server, &silent_url, silent);
    let b = credentials_file(&frozen_dir, &server, &frozen_url, frozen);
    let merged = dir.path().join("credentials.yaml");
    let second = std::fs::read_to_string(&b).unwrap();
    let entries = second.strip_prefix("credentials:\n").unwrap();
    std::fs::write(&merged, std::fs::read_to_string(&a).unwrap() + entries).unwrap();
    let merged = merged.display().to_string();

    let writer = start_writer(&merged, &[]).await;
    let mut agent = writer.agent("uid-1").await;
    let hung = [("gitops/silent", silent_url), ("gitops/frozen", frozen_url)];
    agent
        .declare_stalled_beside_a_healthy_one(&hung, PATH)
        .await;
    agent.expect_remote_unreachable(&hung).await;
    // Nothing reached the served repository, and nothing was acked for the stalled destinations.
    assert_eq!(served.rev_parse("main"), None);
    let replies = agent.drain_for(Duration::from_millis(200)).await;
    assert!(
        !replies.iter().any(|m| matches!(
            m,
            reverser_proto::v1::writer_message::Kind::Ack(a) if a.destination != "gitops/good"
        )),
        "{replies:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), writer.stop())
        .await
        .expect("the writer stops within 10 s");
}

/// Installs a pre-receive hook that blocks while `freeze` exists, then refuses the push it held. With
/// `keep_alive_sec` 0 the server says nothing meanwhile; otherwise it sends git's keep-alive packets that often,
/// so the connection never goes quiet and only the whole-operation deadline can end the push.
fn install_freezing_hook(repo: &BareRepo, freeze: &Path, keep_alive_sec: u32) {
    repo.set_pre_receive_hook(&format!(
        "if [ -e '{0}' ]; then\n  while [ -e '{0}' ]; do sleep 0.1; done\n  exit 1\nfi\nexit 0\n",
        freeze.display()
    ));
    let out = testkit::git(
        Some(&repo.path()),
        &["config", "receive.keepAlive", &keep_alive_sec.to_string()],
    );
    assert!(out.status.success(), "{out:?}");
}

/// A remote whose pre-receive hook can be frozen, and the writer flags to reach it.
struct Remote {
    /// Whether the server sends keep-alive packets while its hook is frozen.
    keep_alive: bool,
    served: BareRepo,
    url: String,
    flags: Vec<String>,
    freeze: std::path::PathBuf,
    log: Box<dyn Fn() -> String>,
    _dir: tempfile::TempDir,
    _server: Box<dyn std::any::Any>,
}

fn ssh_remote(keep_alive_sec: u32) -> Remote {
    let served = BareRepo::new();
    let server = SshGitServer::start(&served);
    let dir = tempfile::tempdir().unwrap();
    let freeze = dir.path().join("freeze");
    install_freezing_hook(&served, &freeze, keep_alive_sec);
    let url = ssh_url(&server, server.port(), &served);
    let credentials = credentials_file(dir.path(), &server, &url, server.port());
    let server = std::rc::Rc::new(server);
    let logged = server.clone();
    Remote {
        keep_alive: keep_alive_sec > 0,
        served,
        url,
        flags: vec!["--git-credentials".into(), credentials],
        freeze,
        log: Box::new(move || logged.log()),
        _dir: dir,
        _server: Box::new(server),
    }
}

fn https_remote(keep_alive_sec: u32) -> Remote {
    let served = BareRepo::new();
    let server = testkit::HttpGitServer::start(&served, "robot", "s3cret-pw");
    let dir = tempfile::tempdir().unwrap();
    let freeze = dir.path().join("freeze");
    install_freezing_hook(&served, &freeze, keep_alive_sec);
    let url = server.url();
    let credentials = dir.path().join("credentials.yaml");
    std::fs::write(
        &credentials,
        format!(
            "credentials:\n  - urlPrefix: {url}\n    username: robot\n    password: s3cret-pw\n"
        ),
    )
    .unwrap();
    let ca = server.ca_file().display().to_string();
    Remote {
        keep_alive: keep_alive_sec > 0,
        served,
        url,
        flags: vec![
            "--git-credentials".into(),
            credentials.display().to_string(),
            "--git-ca-file".into(),
            ca,
        ],
        freeze,
        log: Box::new(String::new),
        _dir: dir,
        _server: Box::new(server),
    }
}

/// The server authenticates, receives the pack and then stalls in its hook: the destination reports
/// `PushFailing`, another repository keeps flowing, and the pending change lands once the server recovers.
async fn push_stalled_after_the_handshake(remote: Remote) {
    let Remote {
        keep_alive,
        served,
        url,
        flags,
        freeze,
        log,
        ..
    } = &remote;
    let mut all = DEADLINES.to_vec();
    all.extend(flags.iter().map(String::as_str));
    let writer = Writer::start(&all).await;
    let mut agent = writer.agent("uid-1").await;
    let dest = "gitops/stalling";
    agent.declare(dest, url, "main", "c").await;
    agent
        .send(upsert(dest, 1, PATH, &configmap("ns", "a", "1")))
        .await;
    agent.ack(dest, 1).await;
    let file = format!("c/{PATH}");
    assert_eq!(
        served.read("main", &file),
        Some(configmap("ns", "a", "1")),
        "{}",
        log()
    );

    std::fs::write(freeze, "").unwrap();
    agent
        .send(upsert(dest, 2, PATH, &configmap("ns", "a", "2")))
        .await;
    let failing = tokio::time::timeout(Duration::from_secs(60), agent.status(dest, "PushFailing"))
        .await
        .expect("PushFailing within a minute");
    assert_eq!(failing.status, "True");
    assert_eq!(failing.reason, "RemoteUnreachable", "{failing:?}");

    let good = BareRepo::new();
    agent
        .declare("gitops/good", &good.file_url(), "main", "c")
        .await;
    agent
        .send(upsert("gitops/good", 1, PATH, &configmap("ns", "a", "1")))
        .await;
    agent.ack("gitops/good", 1).await;

    // The server recovers: the pending change lands and is acked.
    std::fs::remove_file(freeze).unwrap();
    agent.ack(dest, 2).await;
    assert_eq!(served.read("main", &file), Some(configmap("ns", "a", "2")));
    let abandoned = writer
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("gitops_reverser_git_operations_abandoned_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    // Only a server that keeps the push alive needs the watchdog; a silent one fails on the socket timeout.
    assert_eq!(
        abandoned > 0,
        *keep_alive,
        "abandoned operations: {abandoned}"
    );
    tokio::time::timeout(Duration::from_secs(10), writer.stop())
        .await
        .expect("the writer stops within 10 s");
}

#[tokio::test]
async fn an_ssh_push_that_goes_silent_after_the_handshake_fails_in_time_and_lands_when_the_remote_recovers()
 {
    push_stalled_after_the_handshake(ssh_remote(0)).await;
}

#[tokio::test]
async fn an_ssh_push_kept_alive_without_progress_fails_in_time_and_lands_when_the_remote_recovers()
{
    push_stalled_after_the_handshake(ssh_remote(1)).await;
}

/// Not SSH-specific: git's keep-alive packets hold an HTTPS push open just the same.
#[tokio::test]
async fn an_https_push_kept_alive_without_progress_fails_in_time_and_lands_when_the_remote_recovers()
 {
    push_stalled_after_the_handshake(https_remote(1)).await;
}

#[tokio::test]
async fn shutdown_ends_within_its_grace_while_an_ssh_push_is_kept_alive_without_progress() {
    let served = BareRepo::new();
    let server = SshGitServer::start(&served);
    let dir = tempfile::tempdir().unwrap();
    let freeze = dir.path().join("freeze");
    install_freezing_hook(&served, &freeze, 1);
    std::fs::write(&freeze, "").unwrap();
    let url = ssh_url(&server, server.port(), &served);
    let credentials = credentials_file(dir.path(), &server, &url, server.port());
    let writer = start_writer(&credentials, &["--shutdown-grace-sec", "3"]).await;
    let mut agent = writer.agent("uid-1").await;
    let dest = "gitops/ssh";
    agent.declare(dest, &url, "main", "c").await;
    agent
        .send(upsert(dest, 1, PATH, &configmap("ns", "a", "1")))
        .await;
    // Wait until the push is held by the hook (the server logged the key it accepted).
    for waited in 0.. {
        if server.log().contains("Accepted publickey") {
            break;
        }
        assert!(
            waited < 600,
            "the push never reached the server:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(10), writer.stop())
        .await
        .expect("the writer stops within 10 s");
    let replies = agent.drain_for(Duration::from_millis(200)).await;
    assert!(
        !replies.iter().any(
            |m| matches!(m, reverser_proto::v1::writer_message::Kind::Ack(a) if a.destination == dest)
        ),
        "{replies:?}"
    );
    assert_eq!(served.rev_parse("main"), None);
    std::fs::remove_file(&freeze).unwrap();
}
