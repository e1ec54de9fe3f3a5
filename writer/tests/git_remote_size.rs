//! What a seed leaves in the remote: ordinary compressed packs, about the size `git fast-import`
//! makes of the same tree, on `file://` (pushed directly) and over HTTPS (libgit2's push). The
//! clone's own packs are stored uncompressed for speed; none of that may reach a user's remote.
//! Sizes are measured by the git CLI (`git count-objects -v`); nothing here is timed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use reverser_writer::git::{Clone, CommitMeta, FileChange, GitCredentials, PushOutcome, RepoSpec};
use testkit::{BareRepo, HttpGitServer, corpus, git};

const BASE: &str = "clusters/prod";
const OBJECTS: usize = 2_000;
/// The writer's default batch: one commit and one push per this many files.
const BATCH: usize = 200;
/// The remote may hold at most this much more than `git fast-import` of the same tree (its
/// history has one commit and one set of rewritten folders per batch, fast-import's one commit).
const MAX_RATIO: f64 = 1.5;

fn meta(message: String) -> CommitMeta {
    CommitMeta {
        author_name: "bench".into(),
        author_email: "bench@example.com".into(),
        committer_name: "bench".into(),
        committer_email: "bench@example.com".into(),
        message,
    }
}

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

/// Bytes of objects in `repo` (loose and packed), as `git count-objects -v` counts them.
fn object_bytes(repo: &Path) -> u64 {
    let out = git_ok(repo, &["count-objects", "-v"]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    (field("size:") + field("size-pack:")) * 1024
}

/// `git fast-import` of the corpus as one commit; returns the bytes of its objects.
fn fast_import_bytes() -> u64 {
    let repo = BareRepo::new();
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .current_dir(repo.path())
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    let mut stdin = std::io::BufWriter::new(child.stdin.take().unwrap());
    write!(
        stdin,
        "commit refs/heads/main\ncommitter bench <bench@example.com> 1700000000 +0000\ndata 4\nseed\n"
    )
    .unwrap();
    for i in corpus::order(OBJECTS) {
        let data = corpus::yaml(i, "0");
        write!(
            stdin,
            "M 100644 inline {BASE}/{}\ndata {}\n{data}\n",
            corpus::path(i),
            data.len()
        )
        .unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(repo.ls_tree("main").len(), OBJECTS);
    object_bytes(&repo.path())
}

/// Seeds the corpus through a clone of `spec`, a commit and a push per [`BATCH`] files.
fn seed(spec: RepoSpec) {
    let dir = tempfile::tempdir().unwrap();
    let mut clone = Clone::open_or_init(&dir.path().join("clone"), spec).unwrap();
    clone.fetch().unwrap();
    let order = corpus::order(OBJECTS);
    for (k, batch) in order.chunks(BATCH).enumerate() {
        let changes: Vec<_> = batch
            .iter()
            .map(|&i| {
                FileChange::write(format!("{BASE}/{}", corpus::path(i)), corpus::yaml(i, "0"))
            })
            .collect();
        let commit = clone
            .commit(clone.base(), &changes, &meta(format!("batch {k}")))
            .unwrap();
        assert_eq!(clone.push(commit).unwrap(), PushOutcome::Pushed);
    }
}

/// A remote that keeps what it receives as it arrives: no `git gc --auto` after a push (which
/// would compress whatever the client sent) and every push kept as a pack.
fn plain_remote() -> BareRepo {
    let remote = BareRepo::new();
    git_ok(&remote.path(), &["config", "receive.autogc", "false"]);
    git_ok(&remote.path(), &["config", "gc.auto", "0"]);
    git_ok(&remote.path(), &["config", "receive.unpackLimit", "1"]);
    remote
}

fn assert_compact(remote: &BareRepo, transport: &str) {
    assert_eq!(remote.ls_tree("main").len(), OBJECTS, "{transport}");
    git_ok(&remote.path(), &["fsck", "--strict", "--no-dangling"]);
    let baseline = fast_import_bytes();
    let bytes = object_bytes(&remote.path());
    let ratio = bytes as f64 / baseline as f64;
    eprintln!("{transport}: remote {bytes} B, git fast-import {baseline} B ({ratio:.2}x)");
    assert!(
        ratio <= MAX_RATIO,
        "{transport}: the remote holds {bytes} B after the seed, {ratio:.2}x the {baseline} B of \
         `git fast-import` (at most {MAX_RATIO}x)"
    );
}

#[test]
fn a_seed_over_file_url_leaves_compressed_packs_in_the_remote() {
    let remote = plain_remote();
    seed(RepoSpec::new(remote.file_url(), "main"));
    assert_compact(&remote, "file://");
}

#[test]
fn a_seed_over_https_leaves_compressed_packs_in_the_remote() {
    let remote = plain_remote();
    let server = HttpGitServer::start(&remote, "robot", "s3cret-pw");
    let spec = RepoSpec::new(server.url(), "main")
        .with_credentials(GitCredentials::Basic {
            username: "robot".into(),
            password: "s3cret-pw".into(),
        })
        .with_ca_cert_file(server.ca_file());
    seed(spec);
    assert_compact(&remote, "https");
}
