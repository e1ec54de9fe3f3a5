//! Crash safety of the real `reverser-writer` binary: it is killed with SIGKILL at many moments (right after a
//! burst, inside the batch window, right after an ack while the next push runs, while the agent re-sends) and
//! restarted on the same `--work-dir`. A scripted agent does what the protocol asks of a real one: it keeps
//! every message the writer has not acked and re-sends it, with the same sequence number, after Hello +
//! Destination on the new stream. The remote is a bare repo (over file://, and over git:// where a separate
//! server process receives the push), inspected with the git CLI.
//!
//! Why the checks are sound: the agent never has two unacked messages for the same file (a new change to a
//! file is only sent once the previous one was acked), and every message moves its file to a state it never had
//! before (upserts carry unique content, deletes only follow an upsert). So when a message is applied, the
//! remote holds exactly the previous state of that file, and a correct writer must produce exactly one
//! commit per message touching that file, in sending order: a lost change is a missing transition, a
//! duplicated one an extra transition (or an empty commit), a lost pushed commit a tip that is no longer an
//! ancestor of the final branch. (With several unacked versions of one file, re-sending an older, already
//! pushed one would commit it again; the protocol therefore asks agents to re-send only the newest unacked
//! change per path, which the agent's backlog does — see `agent/src/stream/backlog.rs`.)

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use reverser_proto::v1::{self as pb, writer_message::Kind as Out};
use support::{Agent, configmap, delete, upsert};
use testkit::{BareRepo, GitDaemon, HttpGitServer, git};

const DEST: &str = "gitops/crash";
const BASE: &str = "clusters/crash";
const FILES: usize = 12;

/// The real binary, started with `--leases off` on the same work dir every time, killed with SIGKILL.
struct WriterProcess {
    child: tokio::process::Child,
    log: PathBuf,
    /// Where this life listens, read from its "writer listening" log line: a port of its own, so no other
    /// process on the machine can take a fixed port while the writer is dead.
    grpc: SocketAddr,
}

impl WriterProcess {
    async fn start(work_dir: &Path, log: PathBuf) -> WriterProcess {
        Self::start_with(work_dir, log, &[]).await
    }

    async fn start_with(work_dir: &Path, log: PathBuf, extra: &[&str]) -> WriterProcess {
        let out = std::fs::File::create(&log).expect("create writer log");
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
                "--log-level",
                "info",
                "--log-format",
                "json",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn reverser-writer");
        // Bounded, so a writer that never listens fails loudly.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("poll writer") {
                panic!(
                    "reverser-writer exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let listening = text
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|line| line["message"] == "writer listening")
                .and_then(|line| line["grpc_addr"].as_str()?.parse().ok());
            if let Some(grpc) = listening {
                return WriterProcess { child, log, grpc };
            }
            assert!(
                Instant::now() < deadline,
                "reverser-writer does not listen after 60 s:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (`Child::start_kill` sends SIGKILL on Unix) and reap.
    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL the writer");
        let status = self.child.wait().await.expect("reap the writer");
        assert!(!status.success(), "the writer was killed, not stopped");
    }
}

/// Prints a writer's log when the test panics while it is in scope (the temp dir is gone afterwards).
struct ShowLogOnPanic(PathBuf);

impl Drop for ShowLogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- writer log {} ---\n{}",
                self.0.display(),
                std::fs::read_to_string(&self.0).unwrap_or_default()
            );
        }
    }
}

/// Where the writer pushes.
struct Remote {
    repo: BareRepo,
    url: String,
    /// `Some` for git://: `git daemon` runs receive-pack in its own process.
    _daemon: Option<GitDaemon>,
}

impl Remote {
    fn file() -> Remote {
        let repo = BareRepo::new();
        Remote {
            url: repo.file_url(),
            repo,
            _daemon: None,
        }
    }

    fn git_daemon() -> Remote {
        let repo = BareRepo::new();
        let daemon = GitDaemon::start(&repo);
        Remote {
            url: daemon.url(),
            repo,
            _daemon: Some(daemon),
        }
    }

    /// Over file:// libgit2 updates the remote's refs inside the writer process, so a SIGKILL there can leave
    /// the remote's `refs/heads/main.lock` behind, exactly as a git server killed mid-update would; every later
    /// push is then refused until someone removes it (git itself never removes stale locks). Recovering the
    /// remote is not the writer's job, so the test does it, the way an operator would; the writer is dead, so the
    /// lock is stale. Returns how many it removed.
    fn recover_file_remote(&self) -> usize {
        if self._daemon.is_some() {
            return 0;
        }
        let locks = lock_files(&self.repo.path());
        for lock in &locks {
            std::fs::remove_file(lock).expect("remove a stale lock of the remote");
        }
        locks.len()
    }
}

/// Every `*.lock` file under `dir` (what a process killed mid-update leaves behind).
fn lock_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path);
            }
        }
    }
    found
}

/// What the agent intends each file to be, and what the writer has not acked yet.
#[derive(Default)]
struct AgentModel {
    next_sequence: u64,
    /// sequence → (path, content or None for a delete), in sending order.
    unacked: BTreeMap<u64, (String, Option<String>)>,
    /// Every state sent per file, in order (the transitions the history must show, exactly once each).
    sent: BTreeMap<String, Vec<Option<String>>>,
    acks: usize,
    /// Commit ids the writer acked.
    acked_commits: Vec<String>,
    /// Remote tips observed after each crash.
    remote_tips: Vec<String>,
}

impl AgentModel {
    fn path(file: usize) -> String {
        format!("core/v1/configmaps/crash/cm-{file}.yaml")
    }

    fn message(sequence: u64, path: &str, content: &Option<String>) -> pb::AgentMessage {
        match content {
            Some(yaml) => upsert(DEST, sequence, path, yaml),
            None => delete(DEST, sequence, path),
        }
    }

    /// A burst of new changes: every file without an unacked change gets one (an upsert with fresh content,
    /// or now and then a delete of an existing file).
    fn burst(&mut self, round: usize) -> Vec<pb::AgentMessage> {
        let pending: Vec<String> = self.unacked.values().map(|(p, _)| p.clone()).collect();
        let mut messages = Vec::new();
        for file in 0..FILES {
            let path = Self::path(file);
            if pending.contains(&path) {
                continue;
            }
            self.next_sequence += 1;
            let sequence = self.next_sequence;
            let exists = matches!(
                self.sent.get(&path).and_then(|states| states.last()),
                Some(Some(_))
            );
            let content = if exists && (round + file) % 5 == 4 {
                None
            } else {
                Some(configmap(
                    "crash",
                    &format!("cm-{file}"),
                    &format!("v{sequence}"),
                ))
            };
            messages.push(Self::message(sequence, &path, &content));
            self.sent
                .entry(path.clone())
                .or_default()
                .push(content.clone());
            self.unacked.insert(sequence, (path, content));
        }
        messages
    }

    fn resend(&self) -> Vec<pb::AgentMessage> {
        self.unacked
            .iter()
            .map(|(sequence, (path, content))| Self::message(*sequence, path, content))
            .collect()
    }

    /// Books a reply; true for an ack.
    fn observe(&mut self, reply: &Out) -> bool {
        match reply {
            Out::Ack(ack) => {
                assert_eq!(ack.destination, DEST);
                self.unacked.retain(|sequence, _| *sequence > ack.sequence);
                self.acks += 1;
                if !ack.commit_sha.is_empty() {
                    self.acked_commits.push(ack.commit_sha.clone());
                }
                true
            }
            Out::Reject(reject) => panic!("the writer rejected a message: {reject:?}"),
            _ => false,
        }
    }
}

async fn connect(grpc: SocketAddr, url: &str) -> Agent {
    let mut agent = Agent::connect(&format!("http://{grpc}"), "uid-crash").await;
    agent.declare(DEST, url, "main", BASE).await;
    agent
}

/// The next reply, or a panic that says what the writer was doing (log tail, stale lock files).
async fn next_reply(
    agent: &mut Agent,
    what: &str,
    log: &Path,
    work_dir: &Path,
    remote: &Remote,
) -> Option<Result<Out, tonic::Status>> {
    match tokio::time::timeout(support::WAIT - Duration::from_secs(5), agent.next()).await {
        Ok(reply) => reply,
        Err(_) => {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "no reply from the writer while {what}; lock files in the clone: {:?}, in the remote: {:?}\nlog tail (newest first):\n{}",
                lock_files(work_dir),
                lock_files(&remote.repo.path()),
                tail.join("\n")
            )
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Sending {
    /// New changes for every file without an unacked one (after the re-sent backlog).
    Burst,
    /// Only the re-sent backlog (a burst when there is none).
    Backlog,
}

#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long (plus jitter) after the last message went out.
    After(u64),
    /// As soon as the first ack of this life arrives (a push just completed; the next one may be running).
    OnFirstAck,
}

/// One life of the writer: connect, re-send what is unacked, maybe send a burst, SIGKILL while collecting acks.
async fn one_life(
    model: &mut AgentModel,
    remote: &Remote,
    work_dir: &Path,
    log: PathBuf,
    round: usize,
    (send, kill): (Sending, Kill),
) {
    let _show_log = ShowLogOnPanic(log.clone());
    let writer = WriterProcess::start(work_dir, log.clone()).await;
    let mut agent = connect(writer.grpc, &remote.url).await;
    for message in model.resend() {
        agent.send(message).await;
    }
    if matches!(send, Sending::Burst) || model.unacked.is_empty() {
        for message in model.burst(round) {
            agent.send(message).await;
        }
    }
    let kill_at = match kill {
        Kill::After(ms) => Some(
            tokio::time::Instant::now()
                + Duration::from_millis(ms + rand::random_range(0..=ms / 2 + 1)),
        ),
        Kill::OnFirstAck => None,
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)), if kill_at.is_some() => break,
            reply = next_reply(&mut agent, "waiting for an ack", &log, work_dir, remote) => match reply {
                Some(Ok(reply)) => {
                    if model.observe(&reply) && matches!(kill, Kill::OnFirstAck) {
                        break;
                    }
                }
                other => panic!("the stream ended before the kill: {other:?}\n{}", writer.log()),
            },
        }
    }
    writer.kill().await;
    // Acks the writer sent before it died may still be on the wire: they count, it did push.
    while let Some(Ok(reply)) = next_reply(&mut agent, "draining", &log, work_dir, remote).await {
        model.observe(&reply);
    }
    for reply in std::mem::take(&mut agent.seen) {
        model.observe(&reply);
    }
    remote.recover_file_remote();
    if let Some(tip) = remote.repo.rev_parse("main") {
        model.remote_tips.push(tip);
    }
}

fn git_ok(repo: &BareRepo, args: &[&str]) -> String {
    let out = git(Some(&repo.path()), args);
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The checks of the module doc, with the git CLI.
fn verify_remote(model: &AgentModel, repo: &BareRepo) {
    let tip = repo.rev_parse("main").expect("main exists");
    git_ok(repo, &["fsck", "--no-progress"]);

    // Linear history, and no pushed commit lost: every observed tip and every acked commit is an ancestor.
    assert_eq!(
        git_ok(repo, &["rev-list", "--min-parents=2", "main"]),
        "",
        "history must be linear"
    );
    for commit in model.remote_tips.iter().chain(&model.acked_commits) {
        let out = git(
            Some(&repo.path()),
            &["merge-base", "--is-ancestor", commit, &tip],
        );
        assert!(
            out.status.success(),
            "pushed commit {commit} is not an ancestor of the final tip {tip}: it was lost"
        );
    }

    // No empty commit.
    for commit in git_ok(repo, &["rev-list", "main"]).lines() {
        let diff = git_ok(
            repo,
            &[
                "diff-tree",
                "--root",
                "--no-commit-id",
                "-r",
                "--name-only",
                commit,
            ],
        );
        assert!(
            !diff.trim().is_empty(),
            "commit {commit} changes nothing (a duplicated change?)"
        );
    }

    // Per file: the history shows exactly the sent transitions, once each, in order; the tip holds the last.
    for (path, sent) in &model.sent {
        let full = format!("{BASE}/{path}");
        let commits = git_ok(
            repo,
            &["log", "--reverse", "--format=%H", "main", "--", &full],
        );
        let seen: Vec<Option<String>> = commits
            .lines()
            .map(|commit| {
                let out = git(Some(&repo.path()), &["show", &format!("{commit}:{full}")]);
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
            })
            .collect();
        let short = |states: &[Option<String>]| -> Vec<String> {
            states
                .iter()
                .map(|s| match s {
                    Some(yaml) => yaml.lines().last().unwrap_or_default().trim().to_owned(),
                    None => "<deleted>".to_owned(),
                })
                .collect()
        };
        assert_eq!(
            short(&seen),
            short(sent),
            "{full}: the commits touching it must be exactly the sent changes, once each, in order"
        );
        assert_eq!(
            &seen, sent,
            "{full}: committed content differs from what was sent"
        );
        assert_eq!(
            repo.read("main", &full),
            sent.last().cloned().flatten(),
            "{full}: final content"
        );
    }
}

/// Kill moments: immediately after sending, inside the 50 ms batch window, around and after the push, right
/// after an ack (the next push may be running), and while only the re-sent backlog is in flight.
const ROUNDS: &[(Sending, Kill)] = &[
    (Sending::Burst, Kill::After(0)),
    (Sending::Burst, Kill::OnFirstAck),
    (Sending::Backlog, Kill::After(1)),
    (Sending::Burst, Kill::After(3)),
    (Sending::Backlog, Kill::OnFirstAck),
    (Sending::Burst, Kill::After(8)),
    (Sending::Burst, Kill::After(15)),
    (Sending::Backlog, Kill::After(25)),
    (Sending::Burst, Kill::OnFirstAck),
    (Sending::Burst, Kill::After(40)),
    (Sending::Backlog, Kill::After(60)),
    (Sending::Burst, Kill::After(90)),
    (Sending::Burst, Kill::OnFirstAck),
    (Sending::Backlog, Kill::After(130)),
    (Sending::Burst, Kill::After(200)),
    (Sending::Burst, Kill::OnFirstAck),
    (Sending::Burst, Kill::After(300)),
];

async fn crash_and_restart_repeatedly(remote: Remote) {
    let scratch = tempfile::tempdir().unwrap();
    let work_dir = scratch.path().join("work");
    let mut model = AgentModel::default();
    for (round, schedule) in ROUNDS.iter().enumerate() {
        one_life(
            &mut model,
            &remote,
            &work_dir,
            scratch.path().join(format!("writer-{round}.log")),
            round,
            *schedule,
        )
        .await;
    }

    // Last life: no kill until every unacked change is acked.
    let log = scratch.path().join("writer-final.log");
    let _show_log = ShowLogOnPanic(log.clone());
    let writer = WriterProcess::start(&work_dir, log.clone()).await;
    let mut agent = connect(writer.grpc, &remote.url).await;
    let backlog = model.unacked.len();
    for message in model.resend() {
        agent.send(message).await;
    }
    while !model.unacked.is_empty() {
        match next_reply(
            &mut agent,
            "waiting for the last acks",
            &log,
            &work_dir,
            &remote,
        )
        .await
        {
            Some(Ok(reply)) => {
                model.observe(&reply);
            }
            other => panic!(
                "stream ended with {} of {backlog} re-sent changes unacked: {other:?}\n{}",
                model.unacked.len(),
                writer.log()
            ),
        }
    }
    writer.kill().await;

    let total: usize = model.sent.values().map(Vec::len).sum();
    assert!(
        total > FILES,
        "later rounds sent changes after earlier ones were acked ({total} sent)"
    );
    let on_ack_rounds = ROUNDS
        .iter()
        .filter(|(_, kill)| matches!(kill, Kill::OnFirstAck))
        .count();
    assert!(model.acks > on_ack_rounds, "{} acks seen", model.acks);
    verify_remote(&model, &remote.repo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_then_restart_over_file_url_loses_no_pushed_commit_and_lands_every_unacked_change_exactly_once()
 {
    crash_and_restart_repeatedly(Remote::file()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_then_restart_over_git_daemon_loses_no_pushed_commit_and_lands_every_unacked_change_exactly_once()
 {
    crash_and_restart_repeatedly(Remote::git_daemon()).await;
}

/// Pushes one change, SIGKILLs the writer, plants `lock` (relative to the worker's bare clone), restarts and
/// sends a second change: Ok when it is pushed, Err with the writer's complaint when it reports PushFailing.
async fn push_after_stale_lock(lock: &str) -> Result<(), String> {
    let remote = Remote::file();
    let scratch = tempfile::tempdir().unwrap();
    let work_dir = scratch.path().join("work");
    let path = "core/v1/configmaps/crash/locked.yaml";

    let writer = WriterProcess::start(&work_dir, scratch.path().join("first.log")).await;
    let mut agent = connect(writer.grpc, &remote.url).await;
    agent
        .send(upsert(DEST, 1, path, &configmap("crash", "locked", "one")))
        .await;
    agent.ack(DEST, 1).await;
    writer.kill().await;

    let clone = work_dir.join(reverser_writer::git::worker_id(&remote.url, "main"));
    assert!(
        clone.join("HEAD").exists(),
        "the writer's bare clone is at {}",
        clone.display()
    );
    std::fs::write(clone.join(lock), b"").expect("plant the stale lock");

    let writer = WriterProcess::start(&work_dir, scratch.path().join("second.log")).await;
    let mut agent = connect(writer.grpc, &remote.url).await;
    agent
        .send(upsert(DEST, 2, path, &configmap("crash", "locked", "two")))
        .await;
    // A failed flush is retried with backoff and reported on the destination; whichever comes first decides.
    let outcome = loop {
        match agent.next().await {
            Some(Ok(Out::Ack(ack))) if ack.sequence >= 2 => break Ok(()),
            Some(Ok(Out::DestinationStatus(status)))
                if status.r#type == "PushFailing" && status.status == "True" =>
            {
                break Err(format!("{lock}: PushFailing: {}", status.message));
            }
            Some(Ok(_)) => {}
            other => break Err(format!("{lock}: stream ended: {other:?}")),
        }
    };
    writer.kill().await;
    if outcome.is_ok() {
        assert_eq!(
            remote.repo.read("main", &format!("{BASE}/{path}")),
            Some(configmap("crash", "locked", "two"))
        );
    }
    outcome
}

async fn assert_no_wedge(locks: &[&str]) {
    let mut wedged = Vec::new();
    for lock in locks {
        if let Err(why) = push_after_stale_lock(lock).await {
            wedged.push(why);
        }
    }
    assert!(
        wedged.is_empty(),
        "the writer cannot push after a restart with a stale lock:\n{}",
        wedged.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_git_lock_files_left_by_a_killed_writer_do_not_wedge_it_after_restart() {
    assert_no_wedge(&[
        "refs/remotes/origin/main.lock",
        "refs/heads/main.lock",
        "packed-refs.lock",
        "HEAD.lock",
        "config.lock",
        "index.lock",
    ])
    .await;
}

/// SIGKILL while the writer holds committed batches it could not push yet (the HTTPS server refuses its password):
/// nothing of them was acked and nothing reached the remote; the restarted writer lands every re-sent change, each
/// file in exactly one commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_batches_are_held_unpushed_loses_nothing() {
    let repo = BareRepo::new();
    let server = HttpGitServer::start(&repo, "robot", "s3cret-pw");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();
    let credentials = dir.path().join("credentials.yaml");
    std::fs::write(
        &credentials,
        format!(
            "credentials:\n  - urlPrefix: {}\n    username: robot\n    passwordFile: {}\n",
            server.url(),
            password.display()
        ),
    )
    .unwrap();
    let ca = server.ca_file().display().to_string();
    let flags = [
        "--git-ca-file",
        ca.as_str(),
        "--git-credentials",
        credentials.to_str().unwrap(),
    ];
    let work_dir = tempfile::tempdir().unwrap();
    let path = |k: u64| format!("core/v1/configmaps/ns/held-{k}.yaml");
    let message = |k: u64| {
        upsert(
            DEST,
            k,
            &path(k),
            &configmap("ns", &format!("held-{k}"), "1"),
        )
    };

    let log = dir.path().join("writer-1.log");
    let _show = ShowLogOnPanic(log.clone());
    let writer = WriterProcess::start_with(work_dir.path(), log, &flags).await;
    let mut agent = connect(writer.grpc, &server.url()).await;
    agent.send(message(1)).await;
    agent.ack(DEST, 1).await;
    let first = repo.rev_parse("main").expect("the first change was pushed");

    server.set_credentials("robot", "rotated-elsewhere");
    let mut sequence = 1;
    for held in 1..=3u64 {
        for _ in 0..4 {
            sequence += 1;
            agent.send(message(sequence)).await;
        }
        // The worker logs how many batches it holds each time a push fails.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !writer
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .any(|line| line["unpushed_batches"].as_u64() >= Some(held))
        {
            assert!(
                Instant::now() < deadline,
                "{held} held batches not logged:\n{}",
                writer.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let acked_early: Vec<_> = agent
        .drain_for(Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|m| matches!(m, Out::Ack(a) if a.sequence > 1))
        .collect();
    assert!(
        acked_early.is_empty(),
        "acked before pushed: {acked_early:?}"
    );
    writer.kill().await;
    drop(agent);
    assert_eq!(repo.rev_parse("main").as_deref(), Some(first.as_str()));

    // The server takes the password again; the agent re-sends everything not acked to the restarted writer.
    server.set_credentials("robot", "s3cret-pw");
    let log = dir.path().join("writer-2.log");
    let _show = ShowLogOnPanic(log.clone());
    let writer = WriterProcess::start_with(work_dir.path(), log, &flags).await;
    let mut agent = connect(writer.grpc, &server.url()).await;
    for k in 2..=sequence {
        agent.send(message(k)).await;
    }
    agent.ack(DEST, sequence).await;
    let tip = repo.rev_parse("main").unwrap();
    git_ok(&repo, &["merge-base", "--is-ancestor", &first, &tip]);
    git_ok(&repo, &["fsck", "--strict", "--no-dangling"]);
    for k in 1..=sequence {
        let file = format!("{BASE}/{}", path(k));
        assert_eq!(
            repo.read("main", &file).unwrap(),
            configmap("ns", &format!("held-{k}"), "1")
        );
        let commits = git_ok(&repo, &["log", "--format=%H", "main", "--", &file]);
        assert_eq!(commits.lines().count(), 1, "{file}: {commits}");
    }
    writer.kill().await;
}
