//! Micro-benchmarks of the git layer (ignored by default; run with
//! `cargo test -p reverser-writer --release --test git_bench -- --ignored --nocapture`).
//!
//! Targets: seeding 100,000 small files in commits of 200 files is at most 2x `git fast-import`
//! of the same commits; a one-file commit + push in a 100,000-file repository takes <= 50 ms.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reverser_writer::git::{Clone, CommitMeta, FileChange, PushOutcome, RepoSpec};
use testkit::{BareRepo, GitDaemon};

/// Override with `BENCH_FILES` for quicker (profiling) runs.
fn files() -> usize {
    std::env::var("BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
const BATCH: usize = 200;

fn meta(message: String) -> CommitMeta {
    CommitMeta {
        author_name: "bench".into(),
        author_email: "bench@example.com".into(),
        committer_name: "bench".into(),
        committer_email: "bench@example.com".into(),
        message,
    }
}

/// A Kubernetes-like layout: 50 namespaces x 20 kinds x 100 objects.
fn path(i: usize) -> String {
    format!(
        "clusters/prod/ns-{:02}/kind-{:02}/obj-{i:06}.yaml",
        i % 50,
        (i / 50) % 20
    )
}

fn content(i: usize, generation: usize) -> Vec<u8> {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: obj-{i:06}\n  namespace: ns-{:02}\n\
         data:\n  generation: \"{generation}\"\n  payload: \"{}\"\n",
        i % 50,
        "x".repeat(64)
    )
    .into_bytes()
}

/// Commits all files in batches on top of each other; pushes after every commit, or once at
/// the end. Returns (time spent committing, time spent pushing).
fn seed(clone: &mut Clone, push_every_commit: bool) -> (Duration, Duration) {
    let (mut committing, mut pushing) = (Duration::ZERO, Duration::ZERO);
    let mut parent = clone.base();
    for batch in 0..files() / BATCH {
        let started = Instant::now();
        let changes: Vec<_> = (batch * BATCH..(batch + 1) * BATCH)
            .map(|i| FileChange::write(path(i), content(i, 0)))
            .collect();
        let commit = clone
            .commit(parent, &changes, &meta(format!("batch {batch}")))
            .unwrap();
        committing += started.elapsed();
        parent = Some(commit);
        if push_every_commit {
            let started = Instant::now();
            assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
            pushing += started.elapsed();
        }
    }
    if !push_every_commit {
        let started = Instant::now();
        assert_eq!(clone.push(parent.unwrap()).unwrap(), PushOutcome::Pushed);
        pushing += started.elapsed();
    }
    (committing, pushing)
}

fn one_file_rounds(clone: &mut Clone, rounds: usize, generation: usize) -> (Duration, Duration) {
    let (mut commit_time, mut push_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let i = round * 4999 % files();
        let started = Instant::now();
        let change = FileChange::write(path(i), content(i, generation + round));
        let commit = clone
            .commit(
                clone.base(),
                &[change],
                &meta(format!("one {generation} {round}")),
            )
            .unwrap();
        let committed = Instant::now();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
        commit_time += committed - started;
        push_time += committed.elapsed();
    }
    (commit_time / rounds as u32, push_time / rounds as u32)
}

fn fast_import() -> Duration {
    let remote = BareRepo::new();
    let started = Instant::now();
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(remote.path())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = std::io::BufWriter::new(child.stdin.take().unwrap());
    for batch in 0..files() / BATCH {
        let message = format!("batch {batch}");
        write!(
            stdin,
            "commit refs/heads/main\ncommitter bench <bench@example.com> 1700000000 +0000\ndata {}\n{message}\n",
            message.len()
        )
        .unwrap();
        for i in batch * BATCH..(batch + 1) * BATCH {
            let data = content(i, 0);
            write!(stdin, "M 100644 inline {}\ndata {}\n", path(i), data.len()).unwrap();
            stdin.write_all(&data).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    let elapsed = started.elapsed();
    assert_eq!(remote.commit_count("main"), files() / BATCH);
    elapsed
}

#[test]
#[ignore = "benchmark: run explicitly"]
fn seeding_and_single_file_commits_are_fast() {
    let baseline = fast_import();
    println!(
        "git fast-import, {} commits of {BATCH} files: {baseline:?}",
        files() / BATCH
    );

    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();

    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let mut clone = Clone::open_or_init(
        &dir.path().join("w"),
        RepoSpec::new(remote.file_url(), "main"),
    )
    .unwrap();
    let (committing, pushing) = seed(&mut clone, false);
    println!(
        "file://: {} commits of {BATCH} files, one push at the end: commit {committing:?} + push {pushing:?} ({:.2}x fast-import)",
        files() / BATCH,
        ratio(committing + pushing)
    );
    assert_eq!(remote.ls_tree("main").len(), files());

    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let mut clone = Clone::open_or_init(
        &dir.path().join("w"),
        RepoSpec::new(remote.file_url(), "main"),
    )
    .unwrap();
    let (committing, pushing) = seed(&mut clone, true);
    println!(
        "file://: {} commits of {BATCH} files, push after each: commit {committing:?} + push {pushing:?} ({:.2}x fast-import)",
        files() / BATCH,
        ratio(committing + pushing)
    );

    let (commit, push) = one_file_rounds(&mut clone, 20, 1);
    println!(
        "file://: one-file commit {commit:?} + push {push:?} in a {}-file repo",
        files()
    );

    let daemon = GitDaemon::start(&remote);
    drop(clone);
    let mut clone =
        Clone::open_or_init(&dir.path().join("w"), RepoSpec::new(daemon.url(), "main")).unwrap();
    let (commit, push) = one_file_rounds(&mut clone, 20, 100);
    println!(
        "git://: one-file commit {commit:?} + push {push:?} in a {}-file repo",
        files()
    );
}
