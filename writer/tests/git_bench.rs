//! Micro-benchmarks of the git layer alone (ignored by default; run with
//! `cargo test -p reverser-writer --release --test git_bench -- --ignored --nocapture --test-threads 1`).
//! The end-to-end benchmark (gRPC → writer → push, with baselines) is `benches/seed.rs`.
//!
//! `BENCH_FILES` sets the repository size (default 100,000), `BENCH_ORDER=interleaved` the worst
//! order (see `testkit::corpus`).

use testkit::corpus;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reverser_writer::git::{Clone, CommitMeta, FileChange, PushOutcome, RepoSpec};
use testkit::{BareRepo, GitDaemon};

const BASE: &str = "clusters/prod";
const BATCH: usize = 200;

fn files() -> usize {
    std::env::var("BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn meta(message: String) -> CommitMeta {
    CommitMeta {
        author_name: "bench".into(),
        author_email: "bench@example.com".into(),
        committer_name: "bench".into(),
        committer_email: "bench@example.com".into(),
        message,
    }
}

fn change(i: usize, generation: u64) -> FileChange {
    FileChange::write(
        format!("{BASE}/{}", corpus::path(i)),
        corpus::yaml(i, &generation.to_string()),
    )
}

/// `git fast-import` of all files as one commit into `remote`.
fn fast_import(remote: &BareRepo) -> Duration {
    let started = Instant::now();
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(remote.path())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = std::io::BufWriter::new(child.stdin.take().unwrap());
    let message = "seed";
    write!(
        stdin,
        "commit refs/heads/main\ncommitter bench <bench@example.com> 1700000000 +0000\ndata {}\n{message}\n",
        message.len()
    )
    .unwrap();
    for i in corpus::order(files()) {
        let data = corpus::yaml(i, "0");
        write!(
            stdin,
            "M 100644 inline {BASE}/{}\ndata {}\n",
            corpus::path(i),
            data.len()
        )
        .unwrap();
        stdin.write_all(data.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    started.elapsed()
}

/// Commits all files in batches of [`BATCH`], pushing after each (what the writer does).
/// Returns (committing, pushing).
fn seed(clone: &mut Clone) -> (Duration, Duration) {
    let (mut committing, mut pushing) = (Duration::ZERO, Duration::ZERO);
    for (batch, indexes) in corpus::order(files()).chunks(BATCH).enumerate() {
        let started = Instant::now();
        let changes: Vec<_> = indexes.iter().map(|&i| change(i, 0)).collect();
        let commit = clone
            .commit(clone.base(), &changes, &meta(format!("batch {batch}")))
            .unwrap();
        let committed = Instant::now();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
        committing += committed - started;
        pushing += committed.elapsed();
    }
    (committing, pushing)
}

/// Median (commit, push) of `rounds` one-file changes.
fn one_file_rounds(clone: &mut Clone, rounds: usize, generation: u64) -> (Duration, Duration) {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let i = round * 4999 % files();
        let started = Instant::now();
        let commit = clone
            .commit(
                clone.base(),
                &[change(i, generation + round as u64)],
                &meta(format!("one {generation} {round}")),
            )
            .unwrap();
        let committed = Instant::now();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
        samples.push((committed - started, committed.elapsed()));
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    (
        median(samples.iter().map(|s| s.0).collect()),
        median(samples.iter().map(|s| s.1).collect()),
    )
}

fn open(remote_url: String, dir: &std::path::Path) -> Clone {
    Clone::open_or_init(dir, RepoSpec::new(remote_url, "main")).unwrap()
}

#[test]
#[ignore = "benchmark: run explicitly"]
fn git_layer_seed_and_single_file_pushes() {
    let n = files();
    let imported = BareRepo::new();
    let baseline = fast_import(&imported);
    println!("git fast-import of {n} files, one commit: {baseline:?}");

    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let mut clone = open(remote.file_url(), &dir.path().join("w"));
    let started = Instant::now();
    let (committing, pushing) = seed(&mut clone);
    let total = started.elapsed();
    println!(
        "writer git layer, {} commits of {BATCH} files, push after each (file://): {total:?} \
         (commit {committing:?} + push {pushing:?}) = {:.2}x fast-import",
        n.div_ceil(BATCH),
        total.as_secs_f64() / baseline.as_secs_f64()
    );
    assert_eq!(remote.ls_tree("main").len(), n);

    let (commit, push) = one_file_rounds(&mut clone, 21, 1);
    println!("file://: one-file commit {commit:?} + push {push:?} (median of 21)");

    // libgit2's generic push (as for https and ssh), against a packed server repository, from a
    // clone fetched over git://.
    let out = testkit::git(Some(&remote.path()), &["gc", "--quiet"]);
    assert!(out.status.success());
    let daemon = GitDaemon::start(&remote);
    let other = tempfile::tempdir().unwrap();
    let mut clone = open(daemon.url(), &other.path().join("w"));
    let started = Instant::now();
    clone.fetch().unwrap();
    println!(
        "git://: fetch of the whole repository: {:?}",
        started.elapsed()
    );
    let (commit, push) = one_file_rounds(&mut clone, 21, 100);
    println!("git://: one-file commit {commit:?} + push {push:?} (median of 21)");
}
