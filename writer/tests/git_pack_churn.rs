//! Pack merging under churn: objects coming back (a value flipping back and forth, a folder
//! emptied and filled again) are stored in several packs, so merges drop duplicates. The clone
//! must keep its number of packs bounded and merge without errors.

use std::io::Write;
use std::sync::{Arc, Mutex};

use reverser_writer::git::{Clone, CommitMeta, FileChange, PushOutcome, RepoSpec};
use testkit::{BareRepo, git};

fn meta(message: &str) -> CommitMeta {
    CommitMeta {
        author_name: "Alice Admin".into(),
        author_email: "alice@example.com".into(),
        committer_name: "gitops-reverser".into(),
        committer_email: "reverser@example.com".into(),
        message: message.into(),
    }
}

fn git_ok(dir: &std::path::Path, args: &[&str]) -> String {
    let out = git(Some(dir), args);
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pack_count(repo: &std::path::Path) -> usize {
    std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "pack")
        })
        .count()
}

/// The log lines written while `f` runs on this thread.
fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let sink = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    (result, text)
}

#[test]
fn churn_with_recurring_objects_keeps_packs_merged() {
    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let mut clone = Clone::open_or_init(
        &dir.path().join("clone"),
        RepoSpec::new(remote.file_url(), "main"),
    )
    .unwrap();
    let rounds = 120;
    let ((), logs) = logs_of(|| {
        for round in 0..rounds {
            // A few objects whose value flips between two states (their blobs and the trees
            // above them recur every other commit), plus one that is always new.
            let mut changes: Vec<FileChange> = (0..4)
                .map(|k| {
                    FileChange::write(
                        format!("ns-{k}/flip.yaml"),
                        format!("state: {}\n", (round + k) % 2),
                    )
                })
                .collect();
            changes.push(FileChange::write(
                "counter.yaml",
                format!("round: {round}\n"),
            ));
            let commit = clone
                .commit(clone.base(), &changes, &meta(&format!("round {round}")))
                .unwrap();
            assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
        }
    });
    // One pack per commit, merged FANOUT (8) at a time per size tier: a handful remain.
    let count = pack_count(clone.dir());
    assert!(
        count <= 16,
        "{count} packs in the clone after {rounds} commits"
    );
    assert!(
        !logs.contains("merging packs failed"),
        "merges failed:\n{logs}"
    );
    git_ok(
        clone.dir(),
        &["fsck", "--full", "--strict", "--no-dangling"],
    );
    git_ok(
        &remote.path(),
        &["fsck", "--full", "--strict", "--no-dangling"],
    );
    assert_eq!(remote.commit_count("main"), rounds);
    assert_eq!(
        remote.read("main", "counter.yaml").as_deref(),
        Some(format!("round: {}\n", rounds - 1).as_str())
    );
}
