//! End-to-end seeding benchmark: the real writer, in process, fed over real gRPC, pushing to a
//! bare repository over `file://`, smart HTTP (`git http-backend` behind the test HTTPS server)
//! and SSH (OpenSSH `sshd`), compared in the same run with what the git CLI needs for the same
//! tree over the same transport.
//!
//! ```text
//! cargo bench -p reverser-writer --bench seed                      # 10,000 objects
//! BENCH_OBJECTS=100000 cargo bench -p reverser-writer --bench seed
//! ```
//!
//! Environment:
//! - `BENCH_OBJECTS` (default 10000): objects to seed, half ConfigMaps (~300 B), half Deployments
//!   (~2 KiB) over 100 namespaces (see `testkit::corpus`).
//! - `BENCH_ROUNDS` (default 21): one-file changes whose median is reported.
//! - `BENCH_ORDER` = `grouped` (default: per type, then namespace, then name — the order of a
//!   Kubernetes list) or `interleaved` (consecutive objects in different folders: the worst case
//!   for tree rewriting, since every 200-file commit then touches every folder).
//! - `BENCH_GIT_DAEMON=0` skips the `git://` row (the generic network push path).
//! - `BENCH_TRANSPORTS=0` skips the HTTPS and SSH seeds (phase 5 then only runs `file://`).
//! - `BENCH_BATCH_FILES=N` adds writer seeds over HTTPS and SSH with `--git-batch-max-files N`
//!   (fewer, larger pushes: shows what the per-push price of a transport costs a seed).
//! - `BENCH_BASELINES=0` skips the shell peer.
//! - `BENCH_KUSTOMIZATION=create` (or `maintain`) and `BENCH_OMIT_NAMESPACE=1`: the destination's
//!   `spec.kustomization.mode` and `spec.omitNamespace`, to measure what they cost.
//! - `BENCH_ONE_FOLDER=N`: instead of the mix, N ConfigMaps in one namespace, so one folder holds N files (the
//!   one-file rounds then change a file in that folder; `BENCH_OBJECTS` is ignored). The shell peer's one-file
//!   rounds (`git add -A && git commit && git push` in a worktree) are the git CLI's cost of the same change.
//! - `BENCH_SIGNING=1`: writers without credentials of their own (phase 4 and the file:// seed of 5) sign every
//!   commit with an ed25519 key (`commitSigning`), to measure what signing costs.
//!
//! Phases, in this order:
//! 1. `git fast-import` of the identical tree as one commit into an empty bare repository.
//! 2. A shell peer: write the files into a worktree, `git add -A && git commit && git push` over
//!    `file://`; then one-file changes the same way.
//! 3. Not a seed: the YAML parse the writer's session runs on every Upsert, alone, on one thread
//!    (one stream is validated in order, so this is a floor for the writer's seed time).
//! 4. The writer (default batching: a commit per 200 files, one push per run of batches committed while
//!    more changes waited (see `--git-push-max-batches`); `--git-batch-max-wait-sec
//!    0.2` so the tail does not wait 20 s): stream every object as an `Upsert`, wait for the `Ack`
//!    of the last sequence. Then a writer restarted on the same work dir with
//!    `--git-batch-max-wait-sec 0` (flush per change): upsert one changed object, wait for its
//!    `Ack`; the median of `BENCH_ROUNDS` rounds. Then the same through `git daemon` (git://,
//!    libgit2's generic push as for https and ssh), after a `git gc` of the remote as a server
//!    would run it, and `git push` (CLI) of one-file commits to the same server for comparison.
//! 5. Per transport (`file://`, HTTPS, SSH), each into its own empty remote: `git push` (CLI) of
//!    fast-import's repository (the baseline is fast-import + this push), then the writer's seed
//!    as in 4; the remotes' `objects/` sizes after both, and the writer's clone. Over HTTPS, then
//!    one-file changes by a writer flushing every change, against `git push` (CLI) of a one-file
//!    commit to the same server. The remotes run with `receive.autogc` off, so what they hold is
//!    what the client sent (a hosting service repacks later, on its own machines).
//!
//! Each writer seed also reports its pushes and the time spent in them (the writer's
//! `pushes_total` and `push_duration_seconds`), the CPU time of the bench process meanwhile
//! (the writer and the client; the git servers run in other processes), and that of the whole
//! machine (`/proc/stat`: the writer, the client and the git servers). The machine's CPU time
//! spread over its cores is the least time the seed can take on this machine, however well its
//! work overlaps: the table gives it as the writer's *floor*, in the same ratio as the seed, next
//! to the machine CPU time of the baseline (fast-import, then `git push` with its server).
//!
//! The git layer alone (no gRPC, no YAML) has its own micro-benchmark: `tests/git_bench.rs`.
//!
//! Peak RSS is the process's `VmHWM`, reset (`/proc/self/clear_refs`) right before the writer
//! starts, read when the last seed Ack arrived. It includes the in-process gRPC client and the
//! runtime; the bench reports the resident size before the writer started as their baseline
//! (objects are generated on the fly, so the client holds at most the stream's buffer).

use testkit::corpus;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use reverser_proto::v1::{
    self as pb, agent_message::Kind as In, writer_client::WriterClient, writer_message::Kind as Out,
};
use reverser_writer::{Args, RunningWriter};
use testkit::{BareRepo, GitDaemon, HttpGitServer, SshGitServer, git};

const BASE: &str = "clusters/prod";
const DEST: &str = "bench/seed";

/// `BENCH_ONE_FOLDER=N`: the corpus is N ConfigMaps in one namespace (one folder of N files) instead of the mix.
fn one_folder() -> Option<usize> {
    std::env::var("BENCH_ONE_FOLDER")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n| n > 0)
}

/// The corpus's streaming order, or `0..n` for one folder.
fn order(n: usize) -> Vec<usize> {
    match one_folder() {
        Some(_) => (0..n).collect(),
        None => corpus::order(n),
    }
}

/// Path of object `i` relative to the base folder: the corpus's, or ConfigMap `2i` of the corpus moved to `ns-00`.
fn object_path(i: usize) -> String {
    match one_folder() {
        Some(_) => format!("core/v1/configmaps/ns-00/{}.yaml", corpus::name(2 * i)),
        None => corpus::path(i),
    }
}

/// YAML of object `i` (see [`object_path`]).
fn object_yaml(i: usize, revision: &str) -> String {
    match one_folder() {
        Some(_) => {
            let i = 2 * i;
            corpus::configmap(i, revision).replace(
                &format!("namespace: {}\n", corpus::namespace(i)),
                "namespace: ns-00\n",
            )
        }
        None => corpus::yaml(i, revision),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// (VmHWM, VmRSS) of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Bytes of the files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn git_ok(cwd: &Path, args: &[&str]) {
    let out = git(Some(cwd), args);
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The git CLI, isolated from the user's configuration, with an identity and `env` (how to reach
/// and trust a server).
fn git_cli_with(cwd: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new("git");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "peer")
        .env("GIT_AUTHOR_EMAIL", "peer@example.com")
        .env("GIT_COMMITTER_NAME", "peer")
        .env("GIT_COMMITTER_EMAIL", "peer@example.com")
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> String {
    let out = cmd.output().expect("run git");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Baselines

/// `git fast-import` of the whole tree as one commit; returns its wall time, the size of its
/// objects and the repository (the source of the `git push` baselines).
fn fast_import(n: usize) -> (Duration, u64, BareRepo) {
    let remote = BareRepo::new();
    let started = Instant::now();
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .current_dir(remote.path())
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
    let message = "seed";
    write!(
        stdin,
        "commit refs/heads/main\ncommitter bench <bench@example.com> 1700000000 +0000\ndata {}\n{message}\n",
        message.len()
    )
    .and_then(|()| {
        for i in order(n) {
            let data = object_yaml(i, "0");
            write!(
                stdin,
                "M 100644 inline {BASE}/{}\ndata {}\n",
                object_path(i),
                data.len()
            )?;
            stdin.write_all(data.as_bytes())?;
            stdin.write_all(b"\n")?;
        }
        stdin.flush()
    })
    .expect("feeding git fast-import");
    drop(stdin);
    assert!(child.wait().expect("git fast-import").success());
    let elapsed = started.elapsed();
    assert_eq!(remote.ls_tree("main").len(), n, "fast-import tree");
    let bytes = dir_size(&remote.path().join("objects"));
    (elapsed, bytes, remote)
}

struct ShellPeer {
    seed: Duration,
    write_files: Duration,
    add_commit: Duration,
    push: Duration,
    one_file: Duration,
}

/// What shell-based peers do: files in a worktree, `git add -A && git commit`, `git push`.
fn shell_peer(n: usize, rounds: usize) -> ShellPeer {
    let remote = BareRepo::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path().join("work");
    let started = Instant::now();
    git_ok(
        dir.path(),
        &["clone", "--quiet", &remote.file_url(), "work"],
    );
    git_ok(&work, &["config", "user.name", "peer"]);
    git_ok(&work, &["config", "user.email", "peer@example.com"]);
    for i in order(n) {
        let path = work.join(BASE).join(object_path(i));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, object_yaml(i, "0")).expect("write file");
    }
    let written = Instant::now();
    git_ok(&work, &["add", "-A"]);
    git_ok(&work, &["commit", "--quiet", "-m", "seed"]);
    let committed = Instant::now();
    git_ok(&work, &["push", "--quiet", "origin", "HEAD:main"]);
    let pushed = Instant::now();
    assert_eq!(remote.ls_tree("main").len(), n, "shell peer tree");

    let mut samples = Vec::new();
    for round in 0..rounds {
        let i = round * 4999 % n;
        let started = Instant::now();
        std::fs::write(
            work.join(BASE).join(object_path(i)),
            object_yaml(i, &(round + 1).to_string()),
        )
        .expect("write file");
        git_ok(&work, &["add", "-A"]);
        git_ok(&work, &["commit", "--quiet", "-m", "one"]);
        git_ok(&work, &["push", "--quiet", "origin", "HEAD:main"]);
        samples.push(started.elapsed());
    }
    ShellPeer {
        seed: pushed - started,
        write_files: written - started,
        add_commit: committed - written,
        push: pushed - committed,
        one_file: median(samples),
    }
}

/// `git push` (CLI) of one-file commits to `url`: what one changed file costs any git client
/// against that server. The commits are made with plumbing in a bare clone (no worktree to scan),
/// so only the push is timed.
fn cli_one_file_pushes(access: &CliAccess, n: usize, rounds: usize) -> Duration {
    let url = access.url.as_str();
    let git_cli = |cwd: &Path| git_cli_with(cwd, &access.env);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut clone = git_cli(dir.path());
    clone.args(["clone", "--quiet", "--bare", url, "c.git"]);
    run(clone);
    let repo = dir.path().join("c.git");
    let index = dir.path().join("index");
    let plumbing = |args: &[&str]| {
        let mut cmd = git_cli(&repo);
        cmd.env("GIT_INDEX_FILE", &index).args(args);
        run(cmd)
    };
    plumbing(&["read-tree", "main"]);
    let mut samples = Vec::new();
    for round in 0..rounds {
        let i = (round * 4999 + 29) % n;
        let mut hash = git_cli(&repo);
        hash.args(["hash-object", "-w", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = hash.spawn().expect("git hash-object");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(object_yaml(i, &(5000 + round).to_string()).as_bytes())
            .expect("write blob");
        let out = child.wait_with_output().expect("git hash-object");
        let blob = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        plumbing(&[
            "update-index",
            "--cacheinfo",
            &format!("100644,{blob},{BASE}/{}", object_path(i)),
        ]);
        let tree = plumbing(&["write-tree"]);
        let commit = plumbing(&["commit-tree", &tree, "-p", "main", "-m", "cli"]);
        plumbing(&["update-ref", "refs/heads/main", &commit]);
        let mut push = git_cli(&repo);
        push.args(["push", "--quiet", "origin", "main"]);
        let started = Instant::now();
        run(push);
        samples.push(started.elapsed());
    }
    median(samples)
}

/// What the writer does to every Upsert before it reaches git: check the YAML
/// (`reverser_common::yaml::validate_object`), here all objects on one thread (the writer spreads one stream's
/// checks over the cores). Nothing to do with git; for scale.
fn yaml_validation(n: usize) -> Duration {
    let started = Instant::now();
    for i in order(n) {
        let yaml = object_yaml(i, "0");
        reverser_common::yaml::validate_object(yaml.as_bytes()).expect("valid YAML");
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Remotes behind real transports

/// How the git CLI reaches one remote: its URL (with the password, for HTTPS) and environment.
struct CliAccess {
    url: String,
    env: Vec<(String, String)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    File,
    Https,
    Ssh,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::File => "file://",
            Transport::Https => "HTTPS (git http-backend)",
            Transport::Ssh => "SSH (OpenSSH)",
        }
    }
}

const HTTP_USER: &str = "bench";
const HTTP_PASSWORD: &str = "bench-password";

/// One empty bare repository behind one transport, and how the writer and the CLI reach it.
struct Remote {
    repo: BareRepo,
    writer_url: String,
    /// Writer flags for this remote (credentials file, CA).
    writer_args: Vec<String>,
    cli: CliAccess,
    _http: Option<HttpGitServer>,
    _ssh: Option<SshGitServer>,
    _secrets: tempfile::TempDir,
}

impl Remote {
    fn new(transport: Transport) -> Remote {
        let repo = BareRepo::new();
        // Measure what the client sends: no `git gc --auto` after a push (a hosting service
        // repacks later, on its own machines, not on this one while the seed runs).
        git_ok(&repo.path(), &["config", "receive.autogc", "false"]);
        git_ok(&repo.path(), &["config", "gc.auto", "0"]);
        let secrets = tempfile::tempdir().expect("temp dir");
        let credentials = secrets.path().join("credentials.yaml");
        match transport {
            Transport::File => Remote {
                writer_url: repo.file_url(),
                writer_args: Vec::new(),
                cli: CliAccess {
                    url: repo.file_url(),
                    env: Vec::new(),
                },
                repo,
                _http: None,
                _ssh: None,
                _secrets: secrets,
            },
            Transport::Https => {
                let server = HttpGitServer::start(&repo, HTTP_USER, HTTP_PASSWORD);
                let url = server.url();
                std::fs::write(
                    &credentials,
                    format!(
                        "credentials:\n  - urlPrefix: {url}\n    username: {HTTP_USER}\n    password: {HTTP_PASSWORD}\n"
                    ),
                )
                .expect("write credentials");
                let ca = server.ca_file().display().to_string();
                Remote {
                    writer_args: vec![
                        "--git-credentials".into(),
                        credentials.display().to_string(),
                        "--git-ca-file".into(),
                        ca.clone(),
                    ],
                    cli: CliAccess {
                        url: url.replacen(
                            "https://",
                            &format!("https://{HTTP_USER}:{HTTP_PASSWORD}@"),
                            1,
                        ),
                        env: vec![("GIT_SSL_CAINFO".into(), ca)],
                    },
                    writer_url: url,
                    repo,
                    _http: Some(server),
                    _ssh: None,
                    _secrets: secrets,
                }
            }
            Transport::Ssh => {
                use std::os::unix::fs::PermissionsExt as _;
                let server = SshGitServer::start(&repo);
                let url = server.url();
                let key = secrets.path().join("id_ed25519");
                let known_hosts = secrets.path().join("known_hosts");
                std::fs::write(&key, server.client_private_key()).expect("write key");
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod key");
                std::fs::write(&known_hosts, server.known_hosts()).expect("write known_hosts");
                std::fs::write(
                    &credentials,
                    format!(
                        "credentials:\n  - urlPrefix: {url}\n    username: {}\n    sshPrivateKeyFile: {}\n    knownHostsFile: {}\n",
                        server.user(),
                        key.display(),
                        known_hosts.display()
                    ),
                )
                .expect("write credentials");
                let ssh = format!(
                    "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={}",
                    key.display(),
                    known_hosts.display()
                );
                Remote {
                    writer_args: vec![
                        "--git-credentials".into(),
                        credentials.display().to_string(),
                    ],
                    cli: CliAccess {
                        url: url.clone(),
                        env: vec![("GIT_SSH_COMMAND".into(), ssh)],
                    },
                    writer_url: url,
                    repo,
                    _http: None,
                    _ssh: Some(server),
                    _secrets: secrets,
                }
            }
        }
    }

    /// Bytes under the remote's `objects/`.
    fn object_bytes(&self) -> u64 {
        dir_size(&self.repo.path().join("objects"))
    }
}

/// The baseline seed's second half: `git push` (CLI) of `source` (fast-import's repository) into
/// the empty `remote`; returns its wall time and the remote's object bytes afterwards.
fn cli_seed_push(source: &BareRepo, remote: &Remote, n: usize) -> (Duration, u64) {
    let mut push = git_cli_with(&source.path(), &remote.cli.env);
    push.args(["push", "--quiet", &remote.cli.url, "main:refs/heads/main"]);
    let started = Instant::now();
    run(push);
    let elapsed = started.elapsed();
    assert_eq!(remote.repo.ls_tree("main").len(), n, "pushed tree");
    (elapsed, remote.object_bytes())
}

// ---------------------------------------------------------------------------------------------
// The writer

async fn start_writer(
    work_dir: &Path,
    max_wait: &str,
    extra: &[String],
) -> anyhow::Result<RunningWriter> {
    let work = work_dir.display().to_string();
    let mut argv: Vec<String> = [
        "reverser-writer",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
        "--leases",
        "off",
        "--git-batch-max-wait-sec",
        max_wait,
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    argv.extend(extra.iter().cloned());
    if std::env::var("BENCH_SIGNING").as_deref() == Ok("1")
        && !extra.iter().any(|a| a == "--git-credentials")
    {
        argv.extend([
            "--git-credentials".to_owned(),
            signing_credentials(work_dir)?,
        ]);
    }
    let args = Args::try_parse_from(argv)?;
    args.start().await
}

/// A `--git-credentials` file that signs commits to every `file://` and `git://` remote with a new ed25519 key,
/// kept in the writer's work dir (removed with it).
fn signing_credentials(work_dir: &Path) -> anyhow::Result<String> {
    let dir = work_dir.join("bench-signing");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("signing");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(dir.join("signing.pub"));
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()?;
    anyhow::ensure!(status.success(), "ssh-keygen failed");
    let file = dir.join("credentials.yaml");
    let mut text = String::from("commitSigning:\n");
    for prefix in ["file://", "git://"] {
        text.push_str(&format!(
            "  - {{urlPrefix: \"{prefix}\", keyFile: {}}}\n",
            key.display()
        ));
    }
    std::fs::write(&file, text)?;
    Ok(file.display().to_string())
}

/// One `Writer.Sync` stream; replies are read by a task that publishes the highest acked sequence.
struct Agent {
    sender: mpsc::Sender<pb::AgentMessage>,
    acked: watch::Receiver<u64>,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    async fn connect(writer: &RunningWriter, repo_url: &str) -> anyhow::Result<Agent> {
        let mut client = WriterClient::connect(format!("http://{}", writer.grpc_addr)).await?;
        let (sender, receiver) = mpsc::channel(1024);
        sender
            .send(msg(In::Hello(pb::Hello {
                cluster_uid: "bench-cluster".into(),
                cluster_name: "bench".into(),
                instance_id: "bench-0".into(),
                controller_namespace: "gitops-reverser".into(),
                controller_name: "reverser".into(),
                protocol_version: reverser_proto::PROTOCOL_VERSION,
                leader_term: None,
            })))
            .await?;
        sender
            .send(msg(In::Destination(pb::Destination {
                key: DEST.into(),
                repo_url: repo_url.into(),
                branch: "main".into(),
                base_folder: BASE.into(),
                exclusive_mode: false,
                credentials: None,
                age_recipients: Vec::new(),
                kustomization: kustomization_mode().into(),
                omit_namespace: std::env::var("BENCH_OMIT_NAMESPACE").as_deref() == Ok("1"),
                ..Default::default()
            })))
            .await?;
        let mut replies = client
            .sync(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        // Wait for the destination to be accepted before streaming.
        loop {
            match replies.message().await?.and_then(|m| m.kind) {
                Some(Out::DestinationStatus(s)) if s.r#type == "Accepted" => break,
                Some(Out::Reject(r)) => bail!("rejected: {r:?}"),
                Some(_) => {}
                None => bail!("stream ended before the destination was accepted"),
            }
        }
        let (acks, acked) = watch::channel(0);
        let reader = tokio::spawn(async move {
            while let Some(message) = replies.message().await? {
                match message.kind {
                    Some(Out::Ack(ack)) if ack.destination == DEST => {
                        acks.send_modify(|a| *a = (*a).max(ack.sequence));
                    }
                    Some(Out::Reject(r)) => bail!("rejected: {r:?}"),
                    // A bench that cannot push would otherwise wait for its Acks forever.
                    Some(Out::DestinationStatus(s))
                        if matches!(s.r#type.as_str(), "AuthFailed" | "PushFailing")
                            && s.status == "True" =>
                    {
                        bail!("the writer cannot push: {s:?}")
                    }
                    _ => {}
                }
            }
            Ok(())
        });
        Ok(Agent {
            sender,
            acked,
            reader,
        })
    }

    async fn upsert(&self, sequence: u64, i: usize, generation: u64) -> anyhow::Result<()> {
        self.sender
            .send(msg(In::Upsert(pb::Upsert {
                sequence,
                destination: DEST.into(),
                path: object_path(i),
                content: object_yaml(i, &generation.to_string()).into_bytes(),
                object: None,
                operation: pb::Operation::Update as i32,
                author: String::new(),
                event_time: None,
                fingerprint: String::new(),
            })))
            .await
            .context("stream closed")
    }

    async fn wait_ack(&mut self, sequence: u64) -> anyhow::Result<()> {
        let wait = self.acked.wait_for(|&a| a >= sequence);
        match tokio::time::timeout(Duration::from_secs(1200), wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                if self.reader.is_finished() {
                    (&mut self.reader).await??;
                }
                bail!("no ack for sequence {sequence}")
            }
        }
    }
}

fn msg(kind: In) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

struct WriterRun {
    seed: Seeded,
    rss_before_mib: f64,
    peak_rss_mib: f64,
    rss_after_mib: f64,
    /// Bytes on disk after the seed: the writer's clone, the remote.
    clone_bytes: u64,
    remote_bytes: u64,
    one_file: Duration,
    /// (writer, `git push` CLI) over git://.
    one_file_git_daemon: Option<(Duration, Duration)>,
}

async fn one_file_rounds(
    agent: &mut Agent,
    n: usize,
    rounds: usize,
    first_sequence: u64,
    generation: u64,
) -> anyhow::Result<Duration> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let i = (round * 4999 + 17) % n;
        let sequence = first_sequence + round as u64;
        let started = Instant::now();
        agent.upsert(sequence, i, generation + round as u64).await?;
        agent.wait_ack(sequence).await?;
        samples.push(started.elapsed());
    }
    Ok(median(samples))
}

/// What a seed through the writer took: until the last Ack, and the pushes it made.
#[derive(Clone, Copy)]
struct Seeded {
    time: Duration,
    pushes: u64,
    /// Time spent in push attempts (the writer's `push_duration_seconds`).
    pushing: Duration,
    /// CPU time of this process (writer and bench client; not the git servers) during the seed.
    cpu: Duration,
    /// CPU time of the whole machine during the seed (this process, the git servers, anything else running).
    machine_cpu: Duration,
}

impl Seeded {
    /// Pushes, time pushing and CPU, for the log and the table.
    fn summary(&self) -> String {
        let cores = cores();
        format!(
            "{} pushes, {} pushing, {} CPU; machine {} CPU of {} ({:.0} % busy)",
            self.pushes,
            secs(self.pushing),
            secs(self.cpu),
            secs(self.machine_cpu),
            secs(self.time * cores as u32),
            100.0 * self.machine_cpu.as_secs_f64() / (self.time.as_secs_f64() * cores as f64)
        )
    }
}

/// Streams the corpus through a writer (default batching: a commit per 200 files, pushes coalesced) into
/// `remote`, until the Ack of the last object; the writer's work dir stays for later rounds.
async fn seed_through_writer(
    work_dir: &Path,
    remote: &Remote,
    n: usize,
    extra: &[String],
) -> anyhow::Result<Seeded> {
    let mut args = remote.writer_args.clone();
    args.extend(extra.iter().cloned());
    let running = start_writer(work_dir, "0.2", &args).await?;
    let mut agent = Agent::connect(&running, &remote.writer_url).await?;
    let started = Instant::now();
    let cpu_before = testkit::cpu_secs("self");
    let machine_before = testkit::machine_busy_secs();
    for (sequence, i) in (1..).zip(order(n)) {
        agent.upsert(sequence, i, 0).await?;
    }
    agent.wait_ack(n as u64).await?;
    let time = started.elapsed();
    let cpu = Duration::from_secs_f64((testkit::cpu_secs("self") - cpu_before).max(0.0));
    let machine_cpu = machine_cpu_since(machine_before);
    let metrics = admin_metrics(&running).await?;
    drop(agent);
    running.stop().await?;
    // The corpus plus the destination's owner marker and .sourceignore (and its kustomization when created).
    let expected = n + 2 + usize::from(kustomization_mode() == pb::KustomizationMode::Create);
    let files = remote.repo.ls_tree("main");
    if files.len() != expected {
        bail!("the remote has {} files, expected {expected}", files.len());
    }
    Ok(Seeded {
        time,
        pushes: testkit::metric_sum(&metrics, "gitops_reverser_pushes_total") as u64,
        pushing: Duration::from_secs_f64(testkit::metric_sum(
            &metrics,
            "gitops_reverser_push_duration_seconds_sum",
        )),
        cpu,
        machine_cpu,
    })
}

/// The writer's Prometheus metrics, from its admin endpoint.
async fn admin_metrics(running: &RunningWriter) -> anyhow::Result<String> {
    let text = testkit::http_get(&running.admin_addr.to_string(), "/metrics")
        .await
        .context("the writer's /metrics did not answer")?;
    if !text.contains("gitops_reverser_push_duration_seconds") {
        bail!("the writer's /metrics holds no push_duration_seconds: {text:.200}");
    }
    Ok(text)
}

async fn writer(n: usize, rounds: usize, with_daemon: bool) -> anyhow::Result<WriterRun> {
    let remote = Remote::new(Transport::File);
    let work_dir = tempfile::tempdir()?;

    // Seed with the default batching (a commit per 200 files, pushes coalesced).
    reset_peak_rss();
    let rss_before_mib = memory().1;
    let seed = seed_through_writer(work_dir.path(), &remote, n, &[]).await?;
    eprintln!("writer: {} ({})", secs(seed.time), seed.summary());
    let (peak_rss_mib, rss_after_mib) = memory();
    let clone_bytes = dir_size(work_dir.path());
    let remote_bytes = remote.object_bytes();

    // One-file changes: a writer that flushes every change at once, on the same clone.
    let running = start_writer(work_dir.path(), "0", &[]).await?;
    let mut agent = Agent::connect(&running, &remote.writer_url).await?;
    let one_file = one_file_rounds(&mut agent, n, rounds, 1, 1).await?;
    drop(agent);

    let one_file_git_daemon = if with_daemon {
        // A server keeps its repositories packed; without this, `git receive-pack` starts
        // `git gc --auto` on the hundreds of packs the seed left and the rounds measure that.
        git_ok(&remote.repo.path(), &["gc", "--quiet"]);
        let daemon = GitDaemon::start(&remote.repo);
        let mut agent = Agent::connect(&running, &daemon.url()).await?;
        // The first change pays for the new clone's initial fetch; it is not counted.
        one_file_rounds(&mut agent, n, 1, 1, 1000).await?;
        let writer = one_file_rounds(&mut agent, n, rounds, 2, 1001).await?;
        let access = CliAccess {
            url: daemon.url(),
            env: Vec::new(),
        };
        let cli =
            tokio::task::spawn_blocking(move || cli_one_file_pushes(&access, n, rounds)).await?;
        Some((writer, cli))
    } else {
        None
    };
    running.stop().await?;
    Ok(WriterRun {
        seed,
        rss_before_mib,
        peak_rss_mib,
        rss_after_mib,
        clone_bytes,
        remote_bytes,
        one_file,
        one_file_git_daemon,
    })
}

/// A seed over one transport: the baseline (`git push` of fast-import's repository into an
/// empty remote) and the writer (into another empty remote), with the remotes' sizes.
struct TransportRun {
    transport: Transport,
    cli_push: Duration,
    /// The machine's CPU time during that push (the client and the server).
    cli_push_cpu: Duration,
    cli_remote_bytes: u64,
    writer_seed: Seeded,
    writer_remote_bytes: u64,
    writer_clone_bytes: u64,
    /// One changed file, (writer commit + push until its Ack, `git push` CLI of such a commit).
    one_file: Option<(Duration, Duration)>,
}

async fn over_transport(
    transport: Transport,
    source: &'static BareRepo,
    n: usize,
    one_file_rounds_n: usize,
) -> anyhow::Result<TransportRun> {
    let baseline = Remote::new(transport);
    let machine_before = testkit::machine_busy_secs();
    let (cli_push, cli_remote_bytes) =
        tokio::task::block_in_place(|| cli_seed_push(source, &baseline, n));
    let cli_push_cpu = machine_cpu_since(machine_before);
    drop(baseline);
    eprintln!("{}: git push {}", transport.name(), secs(cli_push));

    let remote = Remote::new(transport);
    let work_dir = tempfile::tempdir()?;
    let writer_seed = seed_through_writer(work_dir.path(), &remote, n, &[]).await?;
    let writer_remote_bytes = remote.object_bytes();
    let writer_clone_bytes = dir_size(work_dir.path());
    eprintln!(
        "{}: writer {} ({})",
        transport.name(),
        secs(writer_seed.time),
        writer_seed.summary()
    );

    let one_file = if one_file_rounds_n > 0 {
        let running = start_writer(work_dir.path(), "0", &remote.writer_args).await?;
        let mut agent = Agent::connect(&running, &remote.writer_url).await?;
        let writer = one_file_rounds(&mut agent, n, one_file_rounds_n, 1, 1).await?;
        drop(agent);
        running.stop().await?;
        let cli =
            tokio::task::block_in_place(|| cli_one_file_pushes(&remote.cli, n, one_file_rounds_n));
        Some((writer, cli))
    } else {
        None
    };
    Ok(TransportRun {
        transport,
        cli_push,
        cli_push_cpu,
        cli_remote_bytes,
        writer_seed,
        writer_remote_bytes,
        writer_clone_bytes,
        one_file,
    })
}

/// The writer's seed over `transport` with `--git-batch-max-files files`: how much of the seed
/// time is the number of pushes (each costs the transport's and the server's fixed price).
async fn seed_with_batch(
    transport: Transport,
    n: usize,
    files: usize,
) -> anyhow::Result<(Seeded, u64)> {
    let remote = Remote::new(transport);
    let work_dir = tempfile::tempdir()?;
    let extra = ["--git-batch-max-files".to_owned(), files.to_string()];
    let seed = seed_through_writer(work_dir.path(), &remote, n, &extra).await?;
    eprintln!(
        "{}: writer, {files} files per commit: {} ({})",
        transport.name(),
        secs(seed.time),
        seed.summary()
    );
    Ok((seed, remote.object_bytes()))
}

/// This machine's cores.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The whole machine's CPU time since `before` (a [`testkit::machine_busy_secs`] reading).
fn machine_cpu_since(before: f64) -> Duration {
    Duration::from_secs_f64((testkit::machine_busy_secs() - before).max(0.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `BENCH_KUSTOMIZATION` = `maintain` or `create`: the destination keeps kustomizations (default off).
fn kustomization_mode() -> pb::KustomizationMode {
    match std::env::var("BENCH_KUSTOMIZATION").as_deref() {
        Ok("maintain") => pb::KustomizationMode::Maintain,
        Ok("create") => pb::KustomizationMode::Create,
        _ => pb::KustomizationMode::Off,
    }
}

fn main() -> anyhow::Result<()> {
    let n = one_folder().unwrap_or_else(|| env_usize("BENCH_OBJECTS", 10_000));
    let rounds = env_usize("BENCH_ROUNDS", 21).max(1);
    let with_daemon = std::env::var("BENCH_GIT_DAEMON").as_deref() != Ok("0");
    let with_transports = std::env::var("BENCH_TRANSPORTS").as_deref() != Ok("0");
    let order_name = if corpus::interleaved() {
        "interleaved"
    } else {
        "grouped"
    };
    eprintln!(
        "seeding {n} objects ({order_name} order), {rounds} one-file rounds; load average {}",
        uptime()
    );

    let baselines = std::env::var("BENCH_BASELINES").as_deref() != Ok("0");
    let machine_before = testkit::machine_busy_secs();
    let (imported, imported_bytes, imported_repo) = fast_import(n);
    let imported_cpu = machine_cpu_since(machine_before);
    eprintln!(
        "git fast-import: {} (machine {} CPU)",
        secs(imported),
        secs(imported_cpu)
    );
    // Lives as long as the process: the transport runs push from it.
    let imported_repo: &'static BareRepo = Box::leak(Box::new(imported_repo));
    let peer = if baselines {
        shell_peer(n, rounds)
    } else {
        ShellPeer {
            seed: Duration::ZERO,
            write_files: Duration::ZERO,
            add_commit: Duration::ZERO,
            push: Duration::ZERO,
            one_file: Duration::ZERO,
        }
    };
    eprintln!("shell peer: {}", secs(peer.seed));
    let yaml = yaml_validation(n);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let run = runtime.block_on(writer(n, rounds, with_daemon))?;
    let mut transports = Vec::new();
    let kinds: &[Transport] = if with_transports {
        &[Transport::File, Transport::Https, Transport::Ssh]
    } else {
        &[Transport::File]
    };
    for &transport in kinds {
        let one_file = if transport == Transport::Https {
            rounds
        } else {
            0
        };
        transports.push(runtime.block_on(over_transport(transport, imported_repo, n, one_file))?);
    }
    // BENCH_BATCH_FILES=N: also seed over HTTPS and SSH with N files per commit and push.
    let batch_files = env_usize("BENCH_BATCH_FILES", 0);
    let mut batched = Vec::new();
    if with_transports && batch_files > 0 {
        for transport in [Transport::Https, Transport::Ssh] {
            batched.push((
                transport,
                runtime.block_on(seed_with_batch(transport, n, batch_files))?,
            ));
        }
    }
    let load_after = uptime();

    let ratio = |d: Duration| d.as_secs_f64() / imported.as_secs_f64();
    println!();
    match one_folder() {
        Some(_) => println!(
            "### Seeding {n} ConfigMaps (~300 B) in one namespace, one folder of {n} files, into a bare repo over file://"
        ),
        None => println!(
            "### Seeding {n} objects ({order_name} order; {} ConfigMaps ~300 B, {} Deployments ~2 KiB, {} namespaces) into a bare repo over file://",
            n.div_ceil(2),
            n / 2,
            corpus::namespaces()
        ),
    }
    println!();
    println!("| what | seed | vs fast-import | one changed file (median of {rounds}) |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| `git fast-import`, one commit | {} | 1.00x | — |",
        secs(imported)
    );
    if baselines {
        println!(
            "| shell peer: write files + `git add -A && git commit` + `git push` | {} (files {} + add/commit {} + push {}) | {:.2}x | {} |",
            secs(peer.seed),
            secs(peer.write_files),
            secs(peer.add_commit),
            secs(peer.push),
            ratio(peer.seed),
            millis(peer.one_file)
        );
    }
    println!(
        "| writer: gRPC → a commit per 200 files, pushes coalesced, until the last Ack | {} | {:.2}x | {} |",
        secs(run.seed.time),
        ratio(run.seed.time),
        millis(run.one_file)
    );
    println!(
        "| (not a seed) YAML check alone: `validate_object` of every object, one thread | {} | {:.2}x | — |",
        secs(yaml),
        ratio(yaml)
    );
    if let Some((writer, cli)) = run.one_file_git_daemon {
        println!(
            "| writer, same repo over `git daemon` (git://: libgit2's generic push, as for https/ssh) | — | — | {} |",
            millis(writer)
        );
        println!(
            "| `git push` (CLI) of a one-file commit to the same `git daemon` (push only) | — | — | {} |",
            millis(cli)
        );
    }
    println!();
    println!(
        "Writer memory: peak RSS (VmHWM) {:.0} MiB during the seed, {:.0} MiB resident after it; \
         the process held {:.0} MiB before the writer started (bench client and runtime; included in the peak).",
        run.peak_rss_mib, run.rss_after_mib, run.rss_before_mib
    );
    println!(
        "Disk after the seed: writer's clone {:.1} MiB (its own packs store objects uncompressed), remote objects {:.1} MiB, \
         `git fast-import`'s objects {:.1} MiB.",
        mib(run.clone_bytes),
        mib(run.remote_bytes),
        mib(imported_bytes)
    );
    println!();
    let cores = cores();
    println!(
        "### Seeding {n} objects into an empty remote per transport: the writer vs `git fast-import` + `git push` (CLI)"
    );
    println!();
    println!(
        "| transport | fast-import + `git push` | writer seed | time ratio (target ≤ 1.5x) | writer's pushes, time pushing, CPU of the bench process; of the machine | machine CPU: baseline, writer; the writer's floor on {cores} cores | remote after `git push` | remote after the writer | size ratio (target ≤ 1.5x) | writer's clone |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for t in &transports {
        let baseline = imported + t.cli_push;
        // The writer's seed can take no less than its machine CPU spread over every core.
        let floor = t.writer_seed.machine_cpu.as_secs_f64() / cores as f64;
        println!(
            "| {} | {} ({} + {}) | {} | {:.2}x | {} | {}, {}; {:.2}x | {:.1} MiB | {:.1} MiB | {:.2}x | {:.1} MiB |",
            t.transport.name(),
            secs(baseline),
            secs(imported),
            secs(t.cli_push),
            secs(t.writer_seed.time),
            t.writer_seed.time.as_secs_f64() / baseline.as_secs_f64(),
            t.writer_seed.summary(),
            secs(imported_cpu + t.cli_push_cpu),
            secs(t.writer_seed.machine_cpu),
            floor / baseline.as_secs_f64(),
            mib(t.cli_remote_bytes),
            mib(t.writer_remote_bytes),
            t.writer_remote_bytes as f64 / t.cli_remote_bytes.max(1) as f64,
            mib(t.writer_clone_bytes),
        );
    }
    for (transport, (seed, bytes)) in &batched {
        let t = transports
            .iter()
            .find(|t| t.transport == *transport)
            .expect("same transport");
        let baseline = imported + t.cli_push;
        println!(
            "| {}, writer with `--git-batch-max-files {batch_files}` | {} | {} | {:.2}x | {} | —, {}; {:.2}x | {:.1} MiB | {:.1} MiB | {:.2}x | — |",
            transport.name(),
            secs(baseline),
            secs(seed.time),
            seed.time.as_secs_f64() / baseline.as_secs_f64(),
            seed.summary(),
            secs(seed.machine_cpu),
            seed.machine_cpu.as_secs_f64() / cores as f64 / baseline.as_secs_f64(),
            mib(t.cli_remote_bytes),
            mib(*bytes),
            *bytes as f64 / t.cli_remote_bytes.max(1) as f64,
        );
    }
    for t in &transports {
        if let Some((writer, cli)) = t.one_file {
            println!();
            println!(
                "One changed file in the {n}-object repo over {} (median of {rounds}): writer commit + push until its Ack {}, \
                 `git push` (CLI) of such a commit {} ({:.2}x; target ≤ 1.2x).",
                t.transport.name(),
                millis(writer),
                millis(cli),
                writer.as_secs_f64() / cli.as_secs_f64()
            );
        }
    }
    println!();
    println!(
        "`git fast-import`'s repository: {:.1} MiB of objects. Remotes have `receive.autogc` off (what the client sent \
         is what stays). Load average (1/5/15 min) at the end: {load_after}.",
        mib(imported_bytes)
    );
    Ok(())
}
