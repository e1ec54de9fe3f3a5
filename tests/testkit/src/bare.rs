//! A bare repository in a temp dir, inspected and pushed to with the real `git` CLI.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::util::{git, git_ok};

/// `<tempdir>/repo.git`, created with `git init --bare`. The temp dir is the root that the
/// servers export.
pub struct BareRepo {
    root: TempDir,
    name: String,
}

impl BareRepo {
    /// An empty bare repo named `repo.git` (no branches at all).
    pub fn new() -> Self {
        Self::named("repo.git")
    }

    /// An empty bare repo with the given directory name.
    pub fn named(name: &str) -> Self {
        let root = tempfile::tempdir().expect("cannot create a temp dir");
        let path = root.path().join(name);
        git_ok(
            None,
            &[
                "init",
                "--bare",
                "--quiet",
                "--initial-branch=main",
                path.to_str().expect("utf-8 temp path"),
            ],
        );
        // Like a hosted forge: the server enforces fast-forward too.
        git_ok(
            Some(&path),
            &["config", "receive.denyNonFastForwards", "true"],
        );
        Self {
            root,
            name: name.to_owned(),
        }
    }

    /// The directory that holds the repo (what servers export).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The repo's directory name, e.g. `repo.git`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The repo's absolute path.
    pub fn path(&self) -> PathBuf {
        self.root.path().join(&self.name)
    }

    /// Installs `script` (a `/bin/sh` script) as the server's `pre-receive` hook.
    pub fn set_pre_receive_hook(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let hook = self.path().join("hooks").join("pre-receive");
        std::fs::write(&hook, format!("#!/bin/sh\n{script}")).expect("write the hook");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
            .expect("make the hook executable");
    }

    /// `file:///…/repo.git`.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        git(Some(&self.path()), args)
    }

    /// The commit id `branch` points at, if the branch exists.
    pub fn rev_parse(&self, branch: &str) -> Option<String> {
        let out = self.cli(&[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}"),
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Branch names, sorted.
    pub fn branches(&self) -> Vec<String> {
        lines(&git_ok(
            Some(&self.path()),
            &["for-each-ref", "--format=%(refname:short)", "refs/heads/"],
        ))
    }

    /// Commit subjects on `branch`, newest first.
    pub fn log_subjects(&self, branch: &str) -> Vec<String> {
        lines(&git_ok(
            Some(&self.path()),
            &["log", "--format=%s", branch, "--"],
        ))
    }

    /// Full message of the tip commit of `branch`.
    pub fn tip_message(&self, branch: &str) -> String {
        String::from_utf8_lossy(&git_ok(
            Some(&self.path()),
            &["log", "-1", "--format=%B", branch, "--"],
        ))
        .into_owned()
    }

    /// `path` at the tip of `branch`, or None when it does not exist there.
    pub fn read(&self, branch: &str, path: &str) -> Option<String> {
        let out = self.cli(&["show", &format!("{branch}:{path}")]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every file path at the tip of `branch` (recursive), sorted.
    pub fn ls_tree(&self, branch: &str) -> Vec<String> {
        lines(&git_ok(
            Some(&self.path()),
            &["ls-tree", "-r", "--name-only", branch],
        ))
    }

    /// Number of commits reachable from `branch`.
    pub fn commit_count(&self, branch: &str) -> usize {
        String::from_utf8_lossy(&git_ok(
            Some(&self.path()),
            &["rev-list", "--count", branch, "--"],
        ))
        .trim()
        .parse()
        .expect("rev-list --count prints a number")
    }

    /// Simulates a human: clones with the git CLI, writes `path`, commits and pushes to
    /// `branch` (creating it when missing). Returns the new commit id.
    pub fn commit_as_human(
        &self,
        branch: &str,
        path: &str,
        content: &str,
        message: &str,
    ) -> String {
        let work = tempfile::tempdir().expect("cannot create a temp dir");
        let dir = work.path().join("w");
        let dir_s = dir.to_str().expect("utf-8 temp path");
        git_ok(None, &["clone", "--quiet", &self.file_url(), dir_s]);
        let has_branch = self.rev_parse(branch).is_some();
        if has_branch {
            git_ok(
                Some(&dir),
                &[
                    "checkout",
                    "--quiet",
                    "-B",
                    branch,
                    &format!("origin/{branch}"),
                ],
            );
        } else {
            git_ok(Some(&dir), &["checkout", "--quiet", "--orphan", branch]);
        }
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("file has a parent")).expect("mkdir");
        std::fs::write(&file, content).expect("write file");
        git_ok(Some(&dir), &["add", "--", path]);
        git_ok(
            Some(&dir),
            &[
                "-c",
                "user.name=Human",
                "-c",
                "user.email=human@example.com",
                "commit",
                "--quiet",
                "-m",
                message,
            ],
        );
        git_ok(
            Some(&dir),
            &[
                "push",
                "--quiet",
                "origin",
                &format!("HEAD:refs/heads/{branch}"),
            ],
        );
        self.rev_parse(branch).expect("branch exists after push")
    }
}

impl Default for BareRepo {
    fn default() -> Self {
        Self::new()
    }
}

fn lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
