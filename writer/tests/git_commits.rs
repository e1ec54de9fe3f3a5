//! The git layer against a real bare repository over file://, checked with the git CLI.

use reverser_writer::git::{
    Clone, CommitMeta, FileChange, GitError, PushOutcome, RepoSpec, worker_id,
};
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

/// A clone of `remote`'s `main` in a fresh temp dir (kept alive by the returned guard).
fn clone_of(remote: &BareRepo) -> (tempfile::TempDir, Clone) {
    let dir = tempfile::tempdir().unwrap();
    let url = remote.file_url();
    let path = dir.path().join(worker_id(&url, "main"));
    let clone = Clone::open_or_init(&path, RepoSpec::new(url, "main")).unwrap();
    (dir, clone)
}

fn write(path: &str, content: &str) -> FileChange {
    FileChange::write(path, content.as_bytes())
}

#[test]
fn first_push_to_an_empty_remote_creates_the_branch() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    assert_eq!(clone.fetch().unwrap(), None);
    assert_eq!(clone.base(), None);

    let commit = clone
        .commit(None, &[write("ns/app/cm.yaml", "a: 1\n")], &meta("first"))
        .unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);

    assert_eq!(remote.rev_parse("main"), Some(commit.to_string()));
    assert_eq!(
        remote.read("main", "ns/app/cm.yaml").as_deref(),
        Some("a: 1\n")
    );
    assert_eq!(remote.log_subjects("main"), ["first"]);
    assert_eq!(clone.base(), Some(commit));
}

#[test]
fn a_second_commit_builds_on_the_pushed_one() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let first = clone
        .commit(None, &[write("a.yaml", "1")], &meta("first"))
        .unwrap();
    clone.push(first).unwrap();
    let second = clone
        .commit(clone.base(), &[write("b/c.yaml", "2")], &meta("second"))
        .unwrap();
    assert_eq!(clone.push(second).unwrap(), PushOutcome::Pushed);

    assert_eq!(remote.rev_parse("main"), Some(second.to_string()));
    assert_eq!(remote.commit_count("main"), 2);
    assert_eq!(remote.log_subjects("main"), ["second", "first"]);
    assert_eq!(remote.ls_tree("main"), ["a.yaml", "b/c.yaml"]);
}

#[test]
fn commit_metadata_and_trailers_reach_the_remote() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let message = "update cm\n\nbody line\n\nReverser-Resource: v1/ConfigMap/ns/app\n";
    let commit = clone
        .commit(None, &[write("x.yaml", "x")], &meta(message))
        .unwrap();
    clone.push(commit).unwrap();

    assert_eq!(remote.tip_message("main").trim_end(), message.trim_end());
    let who = git(
        Some(&remote.path()),
        &["log", "-1", "--format=%an <%ae> / %cn <%ce>", "main"],
    );
    assert_eq!(
        String::from_utf8_lossy(&who.stdout).trim(),
        "Alice Admin <alice@example.com> / gitops-reverser <reverser@example.com>"
    );
}

#[test]
fn read_file_and_list_files_see_a_commit() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let commit = clone
        .commit(
            None,
            &[
                write("clusters/a/ns1/cm.yaml", "cm"),
                write("clusters/a/ns1/deploy/web.yaml", "web"),
                write("clusters/a/ns2/svc.yaml", "svc"),
                write("README.md", "hi"),
            ],
            &meta("seed"),
        )
        .unwrap();

    assert_eq!(
        clone
            .read_file(Some(commit), "clusters/a/ns1/deploy/web.yaml")
            .unwrap(),
        Some(b"web".to_vec())
    );
    assert_eq!(
        clone
            .read_file(Some(commit), "clusters/a/missing.yaml")
            .unwrap(),
        None
    );
    assert_eq!(
        clone.read_file(Some(commit), "clusters/a").unwrap(),
        None,
        "a folder is not a file"
    );
    assert_eq!(clone.read_file(None, "README.md").unwrap(), None);

    assert_eq!(
        clone.list_files(Some(commit), "clusters/a/ns1").unwrap(),
        ["clusters/a/ns1/cm.yaml", "clusters/a/ns1/deploy/web.yaml"]
    );
    assert_eq!(clone.list_files(Some(commit), "").unwrap().len(), 4);
    assert!(clone.list_files(Some(commit), "nope").unwrap().is_empty());
    assert!(clone.list_files(None, "").unwrap().is_empty());
}

#[test]
fn deleting_the_last_file_of_a_folder_removes_the_folder() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let seed = clone
        .commit(
            None,
            &[write("keep.yaml", "k"), write("ns/deep/only.yaml", "o")],
            &meta("seed"),
        )
        .unwrap();
    clone.push(seed).unwrap();
    let delete = clone
        .commit(
            clone.base(),
            &[FileChange::delete("ns/deep/only.yaml")],
            &meta("delete"),
        )
        .unwrap();
    clone.push(delete).unwrap();

    assert_eq!(remote.ls_tree("main"), ["keep.yaml"]);
    let dirs = git(
        Some(&remote.path()),
        &["ls-tree", "-d", "-r", "--name-only", "main"],
    );
    assert!(
        dirs.stdout.is_empty(),
        "empty trees left: {}",
        String::from_utf8_lossy(&dirs.stdout)
    );
}

#[test]
fn deleting_a_missing_file_changes_nothing() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let seed = clone
        .commit(None, &[write("a.yaml", "a")], &meta("seed"))
        .unwrap();
    let noop = [FileChange::delete("gone/b.yaml"), write("a.yaml", "a")];
    assert_eq!(
        clone
            .commit_if_changed(Some(seed), &noop, &meta("noop"))
            .unwrap(),
        None
    );
    assert_eq!(
        clone
            .commit_if_changed(None, &[], &meta("nothing"))
            .unwrap(),
        None
    );
    let changed = clone
        .commit_if_changed(Some(seed), &[write("a.yaml", "b")], &meta("change"))
        .unwrap();
    assert!(changed.is_some());
}

#[test]
fn the_last_change_to_a_path_wins() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let commit = clone
        .commit(
            None,
            &[
                write("a.yaml", "old"),
                FileChange::delete("a.yaml"),
                write("a.yaml", "new"),
            ],
            &meta("x"),
        )
        .unwrap();
    assert_eq!(
        clone.read_file(Some(commit), "a.yaml").unwrap(),
        Some(b"new".to_vec())
    );
}

#[test]
fn a_concurrent_human_commit_rejects_our_push_and_survives_the_replay() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let seed = clone
        .commit(None, &[write("ours/a.yaml", "1")], &meta("seed"))
        .unwrap();
    clone.push(seed).unwrap();

    let human = remote.commit_as_human("main", "human/notes.md", "by hand\n", "human edit");

    let stale = clone
        .commit(clone.base(), &[write("ours/b.yaml", "2")], &meta("ours"))
        .unwrap();
    assert_eq!(clone.push(stale).unwrap(), PushOutcome::Rejected);
    assert_eq!(
        remote.rev_parse("main"),
        Some(human.clone()),
        "the remote is untouched"
    );
    assert_eq!(
        clone.base(),
        Some(seed),
        "a rejected push does not move the base"
    );

    let tip = clone.fetch().unwrap();
    assert_eq!(tip.map(|t| t.to_string()), Some(human.clone()));
    assert_eq!(clone.base(), tip);
    let replay = clone
        .commit(clone.base(), &[write("ours/b.yaml", "2")], &meta("ours"))
        .unwrap();
    assert_eq!(clone.push(replay).unwrap(), PushOutcome::Pushed);

    assert_eq!(
        remote.read("main", "human/notes.md").as_deref(),
        Some("by hand\n")
    );
    assert_eq!(remote.read("main", "ours/b.yaml").as_deref(), Some("2"));
    assert_eq!(remote.log_subjects("main"), ["ours", "human edit", "seed"]);
}

#[test]
fn a_push_based_on_an_unfetched_tip_we_never_saw_is_rejected() {
    // The human created the branch before our first fetch: pushing a root commit must not
    // overwrite it.
    let remote = BareRepo::new();
    let human = remote.commit_as_human("main", "h.md", "h", "human first");
    let (_dir, mut clone) = clone_of(&remote);
    let root = clone
        .commit(None, &[write("a.yaml", "a")], &meta("ours"))
        .unwrap();
    assert_eq!(clone.push(root).unwrap(), PushOutcome::Rejected);
    assert_eq!(remote.rev_parse("main"), Some(human));
}

#[test]
fn a_remote_with_other_branches_but_not_ours_is_like_an_empty_one() {
    let remote = BareRepo::new();
    let other = remote.commit_as_human("other", "o.md", "o", "other branch");
    let (_dir, mut clone) = clone_of(&remote);
    assert_eq!(clone.fetch().unwrap(), None);
    let commit = clone
        .commit(None, &[write("a.yaml", "a")], &meta("ours"))
        .unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.branches(), ["main", "other"]);
    assert_eq!(remote.rev_parse("other"), Some(other));
    assert_eq!(remote.ls_tree("main"), ["a.yaml"]);
}

#[test]
fn fetch_after_the_remote_branch_vanished_forgets_the_base() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let commit = clone
        .commit(None, &[write("a.yaml", "a")], &meta("ours"))
        .unwrap();
    clone.push(commit).unwrap();
    let out = git(
        Some(&remote.path()),
        &["update-ref", "-d", "refs/heads/main"],
    );
    assert!(out.status.success());
    assert_eq!(clone.fetch().unwrap(), None);
    assert_eq!(clone.base(), None);
}

#[test]
fn reopening_the_clone_dir_restores_the_base() {
    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w");
    let spec = RepoSpec::new(remote.file_url(), "main");
    let mut clone = Clone::open_or_init(&path, spec.clone()).unwrap();
    let commit = clone
        .commit(None, &[write("a.yaml", "a")], &meta("ours"))
        .unwrap();
    clone.push(commit).unwrap();
    drop(clone);

    let reopened = Clone::open_or_init(&path, spec).unwrap();
    assert_eq!(reopened.base(), Some(commit));
    assert_eq!(
        reopened.read_file(reopened.base(), "a.yaml").unwrap(),
        Some(b"a".to_vec())
    );
    assert!(
        path.join("HEAD").exists() && !path.join(".git").exists(),
        "the clone is bare"
    );
}

#[test]
fn plain_paths_work_as_urls() {
    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    let spec = RepoSpec::new(remote.path().to_str().unwrap(), "main");
    let mut clone = Clone::open_or_init(&dir.path().join("w"), spec).unwrap();
    let commit = clone
        .commit(None, &[write("a.yaml", "a")], &meta("ours"))
        .unwrap();
    assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.rev_parse("main"), Some(commit.to_string()));
}

#[test]
fn invalid_branch_names_are_rejected() {
    let remote = BareRepo::new();
    let dir = tempfile::tempdir().unwrap();
    for branch in ["", "a..b", "has space", "x.lock", "-x", "a~1", "end/"] {
        let err = Clone::open_or_init(
            &dir.path().join("w"),
            RepoSpec::new(remote.file_url(), branch),
        )
        .unwrap_err();
        assert!(
            matches!(err, GitError::InvalidBranch(_)),
            "{branch:?}: {err}"
        );
    }
}

#[test]
fn paths_escaping_the_repository_are_rejected() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    for path in ["../evil", "/abs", ".git/hooks/pre-commit", "a//b", ""] {
        let err = clone
            .commit(None, &[write(path, "x")], &meta("bad"))
            .unwrap_err();
        assert!(matches!(err, GitError::InvalidPath(_)), "{path:?}: {err}");
    }
}

#[test]
fn a_hundred_file_commit_is_readable_pushable_and_buildable_upon() {
    let remote = BareRepo::new();
    let (_dir, mut clone) = clone_of(&remote);
    let changes: Vec<_> = (0..100)
        .map(|i| write(&format!("bulk/{}/f{i}.yaml", i % 7), &format!("{i}")))
        .collect();
    let bulk = clone.commit(None, &changes, &meta("bulk")).unwrap();
    assert_eq!(
        clone.read_file(Some(bulk), "bulk/3/f10.yaml").unwrap(),
        Some(b"10".to_vec())
    );
    assert_eq!(
        clone
            .commit_if_changed(Some(bulk), &changes, &meta("same"))
            .unwrap(),
        None
    );
    assert_eq!(clone.push(bulk).unwrap(), PushOutcome::Pushed);
    let small = clone
        .commit(
            clone.base(),
            &[FileChange::delete("bulk/3/f10.yaml")],
            &meta("small"),
        )
        .unwrap();
    assert_eq!(clone.push(small).unwrap(), PushOutcome::Pushed);
    assert_eq!(remote.ls_tree("main").len(), 99);
    let fsck = git(Some(&remote.path()), &["fsck", "--strict"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
}
