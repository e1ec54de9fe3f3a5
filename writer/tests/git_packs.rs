//! The clone's storage and the local push, checked with the git CLI: packs the writer writes and
//! merges pass `git fsck --strict` and `git verify-pack`, in the clone and in a `file://` remote.

use reverser_writer::git::{Clone, CommitMeta, FileChange, GitError, PushOutcome, RepoSpec};
use testkit::{BareRepo, GitDaemon, git};

fn meta(message: &str) -> CommitMeta {
    CommitMeta {
        author_name: "Alice Admin".into(),
        author_email: "alice@example.com".into(),
        committer_name: "gitops-reverser".into(),
        committer_email: "reverser@example.com".into(),
        message: message.into(),
    }
}

fn clone_of(url: String) -> (tempfile::TempDir, Clone) {
    let dir = tempfile::tempdir().unwrap();
    let clone = Clone::open_or_init(&dir.path().join("clone"), RepoSpec::new(url, "main")).unwrap();
    (dir, clone)
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

fn packs(repo: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut packs: Vec<_> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    packs.sort();
    packs
}

/// `git fsck` finds nothing wrong and every pack verifies.
fn assert_sound(repo: &std::path::Path) {
    git_ok(repo, &["fsck", "--full", "--strict", "--no-dangling"]);
    for pack in packs(repo) {
        git_ok(
            repo,
            &["verify-pack", pack.with_extension("idx").to_str().unwrap()],
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tmp_"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn manifest(i: usize, generation: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\n  namespace: ns-{}\ndata:\n  generation: \"{generation}\"\n",
        i % 7
    )
}

fn path(i: usize) -> String {
    format!("clusters/c/core/v1/configmaps/ns-{}/cm-{i}.yaml", i % 7)
}

#[test]
fn many_commits_keep_clone_and_remote_sound_with_few_packs() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let mut expected = std::collections::BTreeMap::new();
    for round in 0..60 {
        // Writes, rewrites and deletes, some folders emptied and created again.
        let mut changes = Vec::new();
        for k in 0..10 {
            let i = (round * 7 + k * 3) % 45;
            if (round + k) % 9 == 0 {
                changes.push(FileChange::delete(path(i)));
                expected.remove(&path(i));
            } else {
                changes.push(FileChange::write(path(i), manifest(i, round)));
                expected.insert(path(i), manifest(i, round));
            }
        }
        let commit = clone
            .commit(clone.base(), &changes, &meta(&format!("round {round}")))
            .unwrap();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    }
    assert_eq!(remote.commit_count("main"), 60);
    assert_eq!(
        remote.ls_tree("main"),
        expected.keys().cloned().collect::<Vec<_>>()
    );
    for (path, content) in &expected {
        assert_eq!(remote.read("main", path).as_ref(), Some(content), "{path}");
        assert_eq!(
            clone.read_file(clone.base(), path).unwrap().as_deref(),
            Some(content.as_bytes())
        );
    }
    assert_eq!(
        clone.list_files(clone.base(), "clusters/c").unwrap(),
        expected.keys().cloned().collect::<Vec<_>>()
    );
    // 60 commits, one pack each, merged 8 at a time.
    let count = packs(clone.dir()).len();
    assert!(count < 8, "{count} packs in the clone");
    assert_sound(clone.dir());
    assert_sound(&remote.path());

    // A fresh clone of the same directory keeps working (objects are where git expects them).
    let spec = clone.spec().clone();
    let dir = clone.dir().to_owned();
    drop(clone);
    let mut reopened = Clone::open_or_init(&dir, spec).unwrap();
    reopened.fetch().unwrap();
    let commit = reopened
        .commit(
            reopened.base(),
            &[FileChange::write(path(1), "after reopen\n")],
            &meta("after reopen"),
        )
        .unwrap();
    assert_eq!(reopened.push(commit).unwrap(), PushOutcome::Pushed);
    assert_eq!(
        remote.read("main", &path(1)).as_deref(),
        Some("after reopen\n")
    );
}

#[test]
fn fetched_delta_packs_are_merged_into_readable_packs() {
    // A history written by git and repacked with deltas, as a server sends it.
    let remote = BareRepo::new();
    for i in 0..12 {
        remote.commit_as_human(
            "main",
            "big.yaml",
            &manifest(0, i).repeat(40),
            &format!("h{i}"),
        );
    }
    git_ok(
        &remote.path(),
        &["repack", "-a", "-d", "-f", "--depth=50", "--window=50"],
    );
    let (_dir, mut clone) = clone_of(remote.file_url());
    clone.fetch().unwrap();
    let deltas = |dir: &std::path::Path| {
        packs(dir).iter().any(|pack| {
            git_ok(
                dir,
                &[
                    "verify-pack",
                    "-v",
                    pack.with_extension("idx").to_str().unwrap(),
                ],
            )
            .contains("chain length")
        })
    };
    assert!(deltas(clone.dir()), "the fetched pack has deltas");
    // Enough commits for the fetched pack to be merged with ours.
    for round in 0..20 {
        let commit = clone
            .commit(
                clone.base(),
                &[FileChange::write(path(round), manifest(round, round))],
                &meta(&format!("ours {round}")),
            )
            .unwrap();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    }
    assert!(packs(clone.dir()).len() < 8);
    assert!(!deltas(clone.dir()), "merged: deltas expanded");
    assert_sound(clone.dir());
    let log = git_ok(
        clone.dir(),
        &["log", "--format=%s", "refs/remotes/origin/main"],
    );
    assert_eq!(log.lines().count(), 32);
    assert_eq!(
        clone.read_file(clone.base(), "big.yaml").unwrap(),
        Some(manifest(0, 11).repeat(40).into_bytes())
    );
    assert_sound(&remote.path());
}

#[test]
fn several_commits_are_pushed_at_once() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let first = clone
        .commit(None, &[FileChange::write("a/x.yaml", "1")], &meta("first"))
        .unwrap();
    let second = clone
        .commit(
            Some(first),
            &[FileChange::write("b/y.yaml", "2")],
            &meta("second"),
        )
        .unwrap();
    let third = clone
        .commit(
            Some(second),
            &[FileChange::delete("a/x.yaml")],
            &meta("third"),
        )
        .unwrap();
    assert_eq!(clone.push(third).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.log_subjects("main"), ["third", "second", "first"]);
    assert_eq!(remote.ls_tree("main"), ["b/y.yaml"]);
    assert_sound(&remote.path());
}

#[test]
fn a_locked_remote_branch_is_a_lost_race_and_the_remote_is_untouched() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let first = clone
        .commit(None, &[FileChange::write("a.yaml", "1")], &meta("first"))
        .unwrap();
    clone.push(first).unwrap();
    // Another pusher holds the ref lock.
    let lock = remote.path().join("refs/heads/main.lock");
    std::fs::write(&lock, b"").unwrap();
    let second = clone
        .commit(
            clone.base(),
            &[FileChange::write("a.yaml", "2")],
            &meta("second"),
        )
        .unwrap();
    assert_eq!(clone.push(second).unwrap(), PushOutcome::Rejected);
    assert_eq!(remote.rev_parse("main"), Some(first.to_string()));
    std::fs::remove_file(&lock).unwrap();
    assert_eq!(clone.push(second).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.read("main", "a.yaml").as_deref(), Some("2"));
}

#[test]
fn pushing_the_commit_the_remote_already_has_is_a_success() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let first = clone
        .commit(None, &[FileChange::write("a.yaml", "1")], &meta("first"))
        .unwrap();
    assert_eq!(clone.push(first).unwrap(), PushOutcome::Pushed);
    assert_eq!(clone.push(first).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.commit_count("main"), 1);
}

#[test]
fn a_file_and_a_folder_of_the_same_name_conflict() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let base = clone
        .commit(
            None,
            &[
                FileChange::write("a/b.yaml", "folder"),
                FileChange::write("f.yaml", "file"),
            ],
            &meta("base"),
        )
        .unwrap();
    for bad in [
        FileChange::write("a", "a file where a folder is"),
        FileChange::write("f.yaml/x.yaml", "a folder where a file is"),
    ] {
        let err = clone
            .commit(Some(base), std::slice::from_ref(&bad), &meta("bad"))
            .unwrap_err();
        assert!(
            matches!(&err, GitError::Unbuildable(m) if m.contains("conflict")),
            "{bad:?}: {err}"
        );
    }
    // Deleting the file first makes room for the folder, in one commit.
    let replaced = clone
        .commit(
            Some(base),
            &[
                FileChange::delete("f.yaml"),
                FileChange::write("f.yaml/x.yaml", "now a folder"),
            ],
            &meta("replace"),
        )
        .unwrap();
    assert_eq!(clone.push(replaced).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.ls_tree("main"), ["a/b.yaml", "f.yaml/x.yaml"]);
    assert_sound(&remote.path());
}

#[test]
fn names_that_sort_around_a_folder_build_the_tree_git_would() {
    // '-' and '.' sort before '/', '0' after: git orders a folder "a" as "a/".
    let names = [
        "a-b.yaml",
        "a.yaml",
        "a/z.yaml",
        "a0.yaml",
        "a/a/deep.yaml",
        "b.yaml",
    ];
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let mut parent = None;
    // One at a time, in an order unlike git's, so every insertion position is exercised.
    for name in names {
        parent = Some(
            clone
                .commit(parent, &[FileChange::write(name, name)], &meta(name))
                .unwrap(),
        );
    }
    let commit = parent.unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort();
    assert_eq!(remote.ls_tree("main"), sorted);
    assert_sound(&remote.path());
    // The same tree written by git has the same id.
    let work = tempfile::tempdir().unwrap();
    git_ok(work.path(), &["init", "--quiet", "w"]);
    let w = work.path().join("w");
    for name in names {
        let file = w.join(name);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, name).unwrap();
    }
    git_ok(&w, &["add", "-A"]);
    let expected = git_ok(&w, &["write-tree"]);
    let ours = git_ok(&remote.path(), &["rev-parse", "main^{tree}"]);
    assert_eq!(ours.trim(), expected.trim());
}

#[test]
fn commits_built_before_a_restart_are_pushed_from_the_object_database() {
    // After a restart the clone no longer knows which pack holds which commit: the objects to
    // send are found by comparing trees instead.
    let remote = BareRepo::new();
    let (dir, mut clone) = clone_of(remote.file_url());
    let first = clone
        .commit(
            None,
            &[FileChange::write("keep/a.yaml", "a")],
            &meta("first"),
        )
        .unwrap();
    assert_eq!(clone.push(first).unwrap(), PushOutcome::Pushed);
    let second = clone
        .commit(
            Some(first),
            &[
                FileChange::write("keep/b.yaml", "b"),
                FileChange::write("new/deep/c.yaml", "c"),
            ],
            &meta("second"),
        )
        .unwrap();
    let third = clone
        .commit(
            Some(second),
            &[FileChange::delete("keep/a.yaml")],
            &meta("third"),
        )
        .unwrap();
    let spec = clone.spec().clone();
    drop(clone);
    let mut clone = Clone::open_or_init(&dir.path().join("clone"), spec).unwrap();
    assert_eq!(clone.push(third).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.log_subjects("main"), ["third", "second", "first"]);
    assert_eq!(remote.ls_tree("main"), ["keep/b.yaml", "new/deep/c.yaml"]);
    assert_sound(&remote.path());
}

#[test]
fn leftovers_of_an_interrupted_pack_write_are_removed_on_open() {
    let remote = BareRepo::new();
    let (dir, mut clone) = clone_of(remote.file_url());
    let commit = clone
        .commit(None, &[FileChange::write("a.yaml", "a")], &meta("first"))
        .unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    let pack_dir = clone.dir().join("objects/pack");
    let tmp = pack_dir.join("tmp_pack_reverser_1_0000000000000000");
    let orphan = pack_dir.join(format!("pack-{}.pack", "0".repeat(40)));
    std::fs::write(&tmp, b"half a pack").unwrap();
    std::fs::write(&orphan, b"a pack whose index was never written").unwrap();
    let spec = clone.spec().clone();
    drop(clone);
    let clone = Clone::open_or_init(&dir.path().join("clone"), spec).unwrap();
    assert!(!tmp.exists() && !orphan.exists());
    assert_eq!(
        clone.read_file(clone.base(), "a.yaml").unwrap().as_deref(),
        Some(&b"a"[..])
    );
    assert_sound(clone.dir());
}

#[test]
fn network_pushes_send_delta_compressed_packs() {
    // Similar files (manifests of one kind) must reach the remote as deltas, as `git push` would
    // send them, not as whole objects.
    let remote = BareRepo::new();
    // Keep what arrives as a pack, to inspect it.
    git_ok(&remote.path(), &["config", "receive.unpackLimit", "1"]);
    let daemon = GitDaemon::start(&remote);
    let (_dir, mut clone) = clone_of(daemon.url());
    let similar = "a line that every file shares\n".repeat(40);
    let changes: Vec<_> = (0..100)
        .map(|i| FileChange::write(format!("d/f{i}.yaml"), format!("{similar}value: {i}\n")))
        .collect();
    let commit = clone.commit(None, &changes, &meta("similar")).unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    let received = packs(&remote.path());
    assert_eq!(received.len(), 1, "{received:?}");
    let listing = git_ok(
        &remote.path(),
        &[
            "verify-pack",
            "-v",
            received[0].with_extension("idx").to_str().unwrap(),
        ],
    );
    assert!(listing.contains("chain length"), "no deltas:\n{listing}");
    // 100 files of ~1.2 KiB: whole (even zlib-compressed) they would take well over 10 KiB.
    let bytes = std::fs::metadata(&received[0]).unwrap().len();
    assert!(bytes < 10_000, "{bytes} B for 100 similar files");
}

#[test]
fn file_url_pushes_write_delta_compressed_packs() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(remote.file_url());
    let similar = "a line that every file shares\n".repeat(40);
    let changes: Vec<_> = (0..100)
        .map(|i| FileChange::write(format!("d/f{i}.yaml"), format!("{similar}value: {i}\n")))
        .collect();
    let commit = clone.commit(None, &changes, &meta("similar")).unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    let received = packs(&remote.path());
    assert_eq!(received.len(), 1, "{received:?}");
    let listing = git_ok(
        &remote.path(),
        &[
            "verify-pack",
            "-v",
            received[0].with_extension("idx").to_str().unwrap(),
        ],
    );
    assert!(listing.contains("chain length"), "no deltas:\n{listing}");
    let bytes = std::fs::metadata(&received[0]).unwrap().len();
    assert!(bytes < 10_000, "{bytes} B for 100 similar files");
    // The remote's pack is its own file, not one of the clone's (uncompressed) packs.
    let clone_packs = packs(clone.dir());
    assert!(
        clone_packs
            .iter()
            .all(|p| p.file_name() != received[0].file_name()),
        "{clone_packs:?}"
    );
    assert_sound(&remote.path());
}
