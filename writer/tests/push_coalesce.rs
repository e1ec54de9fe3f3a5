//! One push carries many batches: while more changes wait in a worker's queue, the batches it commits are held in
//! its clone and pushed together (when the queue is empty, `--git-push-max-batches` are held or the oldest waited
//! `--git-push-max-delay-sec`). Real servers: smart HTTP (`git http-backend` behind the test HTTPS server) and
//! OpenSSH. Pushes are counted in the remote's reflog (one entry per ref update the server made), batches as the
//! writer's commits (one author: one commit per batch); nothing here is timed.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use reverser_proto::v1::writer_message::Kind as Out;
use support::{Writer, configmap, upsert, upsert_by};
use testkit::{BareRepo, HttpGitServer, SshGitServer, corpus, git};

const DEST: &str = "gitops/coalesce";
const BASE: &str = "clusters/coalesce";
/// A seed of this many objects in batches of [`BATCH`] files: 100 batches.
const OBJECTS: usize = 1_000;
const BATCH: &str = "10";

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(Some(dir), args);
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A remote that logs every update of its refs (a bare repository does not by default).
fn logged_remote() -> BareRepo {
    let remote = BareRepo::new();
    git_ok(
        &remote.path(),
        &["config", "core.logAllRefUpdates", "always"],
    );
    remote
}

/// Updates of `main` the server made: one per successful push (and one per human push).
fn ref_updates(remote: &BareRepo) -> usize {
    git_ok(
        &remote.path(),
        &["reflog", "show", "--format=%H", "main", "--"],
    )
    .lines()
    .count()
}

/// A metric of the writer summed over its label sets, 0 when absent.
async fn metric(writer: &Writer, name: &str) -> f64 {
    testkit::metric_sum(&writer.metrics().await, name)
}

/// Waits (bounded, not timed) until a metric reaches `at_least`.
async fn wait_for_metric(writer: &Writer, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let value = metric(writer, name).await;
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {value}, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the writer pushes and the flags that let it.
struct Server {
    url: String,
    flags: Vec<String>,
    _http: Option<HttpGitServer>,
    _ssh: Option<SshGitServer>,
    _files: tempfile::TempDir,
}

impl Server {
    fn https(remote: &BareRepo) -> Server {
        let http = HttpGitServer::start(remote, "robot", "s3cret-pw");
        let files = tempfile::tempdir().unwrap();
        let password = files.path().join("password");
        std::fs::write(&password, "s3cret-pw\n").unwrap();
        let credentials = files.path().join("credentials.yaml");
        std::fs::write(
            &credentials,
            format!(
                "credentials:\n  - urlPrefix: {}\n    username: robot\n    passwordFile: {}\n",
                http.url(),
                password.display()
            ),
        )
        .unwrap();
        Server {
            url: http.url(),
            flags: vec![
                "--git-ca-file".into(),
                http.ca_file().display().to_string(),
                "--git-credentials".into(),
                credentials.display().to_string(),
            ],
            _http: Some(http),
            _ssh: None,
            _files: files,
        }
    }

    fn ssh(remote: &BareRepo) -> Server {
        let ssh = SshGitServer::start(remote);
        let files = tempfile::tempdir().unwrap();
        let key = files.path().join("id_ed25519");
        std::fs::write(&key, ssh.client_private_key()).unwrap();
        let known_hosts = files.path().join("known_hosts");
        std::fs::write(&known_hosts, ssh.known_hosts()).unwrap();
        let url = ssh.url();
        let credentials = files.path().join("credentials.yaml");
        std::fs::write(
            &credentials,
            format!(
                "credentials:\n  - urlPrefix: {url}\n    username: {}\n    sshPrivateKeyFile: {}\n    knownHostsFile: {}\n",
                ssh.user(),
                key.display(),
                known_hosts.display()
            ),
        )
        .unwrap();
        Server {
            url,
            flags: vec![
                "--git-credentials".into(),
                credentials.display().to_string(),
            ],
            _http: None,
            _ssh: Some(ssh),
            _files: files,
        }
    }
}

/// What a seed cost: batches and pushes as the remote counts them, and as the writer's metrics count them.
struct Counts {
    batches: usize,
    pushes: usize,
    metric_batches: f64,
    metric_pushes: f64,
    metric_unpushed: f64,
}

impl Counts {
    fn assert_metrics_agree(&self) {
        assert_eq!(self.metric_batches, self.batches as f64, "batches pushed");
        assert_eq!(self.metric_pushes, self.pushes as f64, "pushes");
        assert_eq!(self.metric_unpushed, 0.0, "held batches after the last ack");
    }
}

/// Seeds [`OBJECTS`] objects at [`BATCH`] files per batch.
async fn seed(make_server: fn(&BareRepo) -> Server, extra: &[&str]) -> Counts {
    let remote = logged_remote();
    let server = make_server(&remote);
    let mut flags: Vec<&str> = server.flags.iter().map(String::as_str).collect();
    flags.extend(["--git-batch-max-files", BATCH]);
    flags.extend_from_slice(extra);
    let writer = Writer::start(&flags).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &server.url, "main", BASE).await;
    for (sequence, i) in (1..).zip(corpus::order(OBJECTS)) {
        agent
            .send(upsert(
                DEST,
                sequence,
                &corpus::path(i),
                &corpus::yaml(i, "0"),
            ))
            .await;
    }
    agent.ack(DEST, OBJECTS as u64).await;
    // The corpus plus the destination's owner marker and its ignore rules for Flux (.sourceignore).
    assert_eq!(remote.ls_tree("main").len(), OBJECTS + 2);
    git_ok(&remote.path(), &["fsck", "--strict", "--no-dangling"]);
    let counts = Counts {
        batches: remote.commit_count("main"),
        pushes: ref_updates(&remote),
        metric_batches: metric(&writer, "gitops_reverser_commit_batches_total").await,
        metric_pushes: metric(&writer, "gitops_reverser_pushes_total").await,
        metric_unpushed: metric(&writer, "gitops_reverser_unpushed_batches").await,
    };
    writer.stop().await;
    eprintln!("{} batches in {} pushes", counts.batches, counts.pushes);
    assert!(
        counts.batches >= OBJECTS / 10,
        "{} commits for {OBJECTS} objects in batches of {BATCH}",
        counts.batches
    );
    counts
}

fn assert_coalesced(transport: &str, counts: Counts) {
    let (batches, pushes) = (counts.batches, counts.pushes);
    assert!(
        pushes * 4 <= batches,
        "{transport}: {pushes} pushes for {batches} batches; a seed's batches should share pushes"
    );
    counts.assert_metrics_agree();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_over_https_makes_far_fewer_pushes_than_batches() {
    assert_coalesced("https", seed(Server::https, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_over_ssh_makes_far_fewer_pushes_than_batches() {
    assert_coalesced("ssh", seed(Server::ssh, &[]).await);
}

/// Both bounds work, each alone: at one held batch, or with no delay allowed, every batch is its own push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_push_bound_at_its_minimum_pushes_every_batch() {
    let counts = seed(Server::https, &["--git-push-max-batches", "1"]).await;
    assert_eq!(counts.pushes, counts.batches, "--git-push-max-batches 1");
    counts.assert_metrics_agree();
    let counts = seed(
        Server::https,
        &[
            "--git-push-max-delay-sec",
            "0",
            "--git-push-max-batches",
            "1000",
        ],
    )
    .await;
    assert_eq!(counts.pushes, counts.batches, "--git-push-max-delay-sec 0");
    counts.assert_metrics_agree();
}

#[tokio::test]
async fn invalid_push_bounds_are_refused_at_start() {
    use clap::Parser;
    let parse = |flags: &[&str]| {
        let mut argv = vec!["reverser-writer"];
        argv.extend_from_slice(flags);
        reverser_writer::Args::try_parse_from(argv)
    };
    assert!(parse(&["--git-push-max-batches", "0"]).is_err());
    let work_dir = tempfile::tempdir().unwrap();
    let work = work_dir.path().display().to_string();
    let args = parse(&[
        "--git-push-max-delay-sec=-1",
        "--leases",
        "off",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--work-dir",
        &work,
    ])
    .unwrap();
    let error = args
        .start()
        .await
        .err()
        .expect("a negative delay is refused");
    assert!(
        error.to_string().contains("--git-push-max-delay-sec"),
        "{error}"
    );
}

/// The writer holds three batches (three authors) it cannot push (the server refuses its password for a while);
/// meanwhile a human pushes to the branch. Once the server takes the password again, the writer's push is rejected,
/// it fetches, replays the three batches on the human's commit and pushes them in one push: the history is a
/// fast-forward of the human's commit, every batch keeps its author, and nothing is acked before it is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_human_push_while_several_batches_are_held_is_replayed_under_them() {
    let remote = logged_remote();
    let server = Server::https(&remote);
    let http = server._http.as_ref().unwrap();
    let flags: Vec<&str> = server.flags.iter().map(String::as_str).collect();
    let writer = Writer::start(&flags).await;
    let mut agent = writer.agent("uid-1").await;
    agent.declare(DEST, &server.url, "main", "c").await;
    let path = |name: &str| format!("core/v1/configmaps/ns/{name}.yaml");
    agent
        .send(upsert(
            DEST,
            1,
            &path("first"),
            &configmap("ns", "first", "1"),
        ))
        .await;
    agent.ack(DEST, 1).await;
    let first = remote
        .rev_parse("main")
        .expect("the first change was pushed");

    // The server stops taking the writer's password: each batch is committed and held.
    http.set_credentials("robot", "rotated-elsewhere");
    let authors = ["alice@example.com", "bob@example.com", "carol@example.com"];
    let mut sequence = 1;
    for (held, author) in (1..).zip(authors) {
        for k in 0..3 {
            sequence += 1;
            let name = format!("{}-{k}", author.split('@').next().unwrap());
            agent
                .send(upsert_by(
                    DEST,
                    sequence,
                    &path(&name),
                    &configmap("ns", &name, "1"),
                    author,
                ))
                .await;
        }
        wait_for_metric(&writer, "gitops_reverser_unpushed_batches", held as f64).await;
    }
    assert_eq!(
        metric(&writer, "gitops_reverser_unpushed_batches").await,
        3.0
    );
    let early: Vec<_> = agent
        .drain_for(Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|m| matches!(m, Out::Ack(a) if a.sequence > 1))
        .collect();
    assert!(early.is_empty(), "acked before pushed: {early:?}");
    assert_eq!(remote.rev_parse("main").as_deref(), Some(first.as_str()));

    let human = remote.commit_as_human("main", "docs/README.md", "hello\n", "docs: add readme");
    let pushes_before = metric(&writer, "gitops_reverser_pushes_total").await;
    http.set_credentials("robot", "s3cret-pw");
    agent.ack(DEST, sequence).await;

    // One push carried the three batches, on top of the human's commit.
    assert_eq!(
        metric(&writer, "gitops_reverser_pushes_total").await,
        pushes_before + 1.0
    );
    assert!(metric(&writer, "gitops_reverser_rebase_retries_total").await >= 1.0);
    let tip = remote.rev_parse("main").unwrap();
    for ancestor in [&first, &human] {
        git_ok(
            &remote.path(),
            &["merge-base", "--is-ancestor", ancestor, &tip],
        );
    }
    let log = git_ok(
        &remote.path(),
        &["log", "--format=%ae %s", &format!("{human}..main")],
    );
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    for (line, author) in lines.iter().rev().zip(authors) {
        assert!(line.starts_with(author), "{log}");
    }
    assert_eq!(
        remote.read("main", "docs/README.md").as_deref(),
        Some("hello\n")
    );
    for author in authors {
        for k in 0..3 {
            let name = format!("{}-{k}", author.split('@').next().unwrap());
            assert_eq!(
                remote.read("main", &format!("c/{}", path(&name))).unwrap(),
                configmap("ns", &name, "1")
            );
        }
    }
    assert_eq!(
        metric(&writer, "gitops_reverser_unpushed_batches").await,
        0.0
    );
    drop(agent);
    writer.stop().await;
}

/// A pre-receive hook that, while `hold` exists, creates `reached` and waits; then it lets the push through.
fn install_holding_hook(remote: &BareRepo, hold: &Path, reached: &Path) {
    remote.set_pre_receive_hook(&format!(
        "if [ -e '{0}' ]; then\n  touch '{1}'\n  while [ -e '{0}' ]; do sleep 0.05; done\nfi\nexit 0\n",
        hold.display(),
        reached.display()
    ));
}

/// Waits (bounded) until `path` exists.
async fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until a metric has kept its value for a second; returns it.
async fn settled_metric(writer: &Writer, name: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = metric(writer, name).await;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let value = metric(writer, name).await;
        if value != last {
            (last, since) = (value, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            return value;
        }
        assert!(Instant::now() < deadline, "{name} kept changing");
    }
}

/// An HTTPS remote whose hook holds a push while `hold` exists, and a writer pushing to it with `extra` flags.
struct HeldRemote {
    remote: BareRepo,
    server: Server,
    hold: std::path::PathBuf,
    reached: std::path::PathBuf,
    _files: tempfile::TempDir,
}

impl HeldRemote {
    fn new() -> HeldRemote {
        let remote = logged_remote();
        let server = Server::https(&remote);
        let files = tempfile::tempdir().unwrap();
        let hold = files.path().join("hold");
        let reached = files.path().join("reached");
        install_holding_hook(&remote, &hold, &reached);
        std::fs::write(&hold, "").unwrap();
        HeldRemote {
            remote,
            server,
            hold,
            reached,
            _files: files,
        }
    }

    /// A writer with `extra` flags and an agent that declared the destination and sent the first `first` objects,
    /// once the server holds the push that carries them.
    async fn start_held(&self, extra: &[&str], first: usize) -> (Writer, support::Agent) {
        let mut flags: Vec<&str> = self.server.flags.iter().map(String::as_str).collect();
        flags.extend_from_slice(extra);
        let writer = Writer::start(&flags).await;
        let mut agent = writer.agent("uid-1").await;
        agent.declare(DEST, &self.server.url, "main", BASE).await;
        self.send(&mut agent, 0..first).await;
        wait_for_file(&self.reached).await;
        (writer, agent)
    }

    /// Sends objects `range` of the corpus (sequence = index + 1).
    async fn send(&self, agent: &mut support::Agent, range: std::ops::Range<usize>) {
        for i in range {
            agent
                .send(upsert(
                    DEST,
                    i as u64 + 1,
                    &corpus::path(i),
                    &corpus::yaml(i, "0"),
                ))
                .await;
        }
    }

    fn release(&self) {
        std::fs::remove_file(&self.hold).unwrap();
    }
}

/// A push runs in the background: while the server holds it, the worker goes on committing the next batches on top
/// of it, acks none of them, and pushes them in one push once the first has landed. (A worker that pushed in the
/// foreground would commit nothing more until the first push ended.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_committed_while_a_push_runs_and_acked_only_once_pushed() {
    let held = HeldRemote::new();
    // The first batch: committed, then pushed; the server holds that push.
    let (writer, mut agent) = held.start_held(&["--git-batch-max-files", "10"], 10).await;
    // Three more batches are committed on top of it meanwhile.
    held.send(&mut agent, 10..40).await;
    wait_for_metric(&writer, "gitops_reverser_unpushed_batches", 4.0).await;
    let early: Vec<_> = agent
        .drain_for(Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|m| matches!(m, Out::Ack(_)))
        .collect();
    assert!(early.is_empty(), "acked before pushed: {early:?}");
    assert_eq!(
        held.remote.rev_parse("main"),
        None,
        "the push is still held"
    );
    assert_eq!(metric(&writer, "gitops_reverser_pushes_total").await, 0.0);

    held.release();
    agent.ack(DEST, 40).await;
    assert_eq!(held.remote.ls_tree("main").len(), 40 + 2);
    git_ok(&held.remote.path(), &["fsck", "--strict", "--no-dangling"]);
    assert_eq!(held.remote.commit_count("main"), 4, "one commit per batch");
    // The held push, then one push carrying the three batches committed during it.
    assert_eq!(ref_updates(&held.remote), 2);
    assert_eq!(metric(&writer, "gitops_reverser_pushes_total").await, 2.0);
    assert_eq!(
        metric(&writer, "gitops_reverser_unpushed_batches").await,
        0.0
    );
    writer.stop().await;
}

/// Commits made while a push runs go to packs that are not merged (merging would delete packs the push may be
/// reading): past a bound, commits wait for the push instead of piling up packs, and the packs are merged again
/// once no push runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_a_long_push_once_their_packs_pile_up_and_nothing_is_lost() {
    const OBJECTS: usize = 300;
    let held = HeldRemote::new();
    // One file per batch, and no batch bound to stop the commits first.
    let (writer, mut agent) = held
        .start_held(
            &[
                "--git-batch-max-files",
                "1",
                "--git-push-max-batches",
                "1000",
            ],
            1,
        )
        .await;
    held.send(&mut agent, 1..OBJECTS).await;
    let plateau = settled_metric(&writer, "gitops_reverser_unpushed_batches").await;
    // A pack per commit while merges are paused; 128 packs at most, counting those from before.
    assert!(
        (100.0..=129.0).contains(&plateau),
        "{plateau} batches held while the push ran"
    );
    assert_eq!(
        held.remote.rev_parse("main"),
        None,
        "the push is still held"
    );

    held.release();
    agent.ack(DEST, OBJECTS as u64).await;
    assert_eq!(held.remote.ls_tree("main").len(), OBJECTS + 2);
    git_ok(&held.remote.path(), &["fsck", "--strict", "--no-dangling"]);
    // One more change after the pushes: its commit merges the packs again.
    agent
        .send(upsert(
            DEST,
            OBJECTS as u64 + 1,
            &corpus::path(0),
            &corpus::yaml(0, "1"),
        ))
        .await;
    agent.ack(DEST, OBJECTS as u64 + 1).await;
    let work_dir = writer.stop().await;
    let packs = walk_packs(work_dir.path());
    assert!(packs <= 24, "{packs} packs left in the clone");
}

/// The `.pack` files under `dir`.
fn walk_packs(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            count += walk_packs(&path);
        } else if path.extension().is_some_and(|e| e == "pack") {
            count += 1;
        }
    }
    count
}

/// A shutdown while a push is held waits for it, then pushes what was committed after it: nothing committed is left
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_the_push_in_flight_and_pushes_what_came_after_it() {
    let held = HeldRemote::new();
    let (writer, mut agent) = held.start_held(&["--git-batch-max-files", "10"], 10).await;
    held.send(&mut agent, 10..30).await;
    wait_for_metric(&writer, "gitops_reverser_unpushed_batches", 3.0).await;
    let release = {
        let hold = held.hold.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            std::fs::remove_file(hold).unwrap();
        })
    };
    writer.stop().await;
    release.await.unwrap();
    assert_eq!(held.remote.ls_tree("main").len(), 30 + 2);
    assert_eq!(held.remote.commit_count("main"), 3);
    assert_eq!(ref_updates(&held.remote), 2);
}
