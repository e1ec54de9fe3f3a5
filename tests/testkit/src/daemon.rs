//! `git daemon` serving a root directory over git:// with push enabled.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tempfile::TempDir;

use crate::BareRepo;
use crate::util::{ChildGuard, free_port, git_command, git_command_at};

/// A running `git daemon --export-all --enable=receive-pack` on 127.0.0.1.
pub struct GitDaemon {
    _child: ChildGuard,
    _logs: TempDir,
    port: u16,
    repo_name: String,
}

impl GitDaemon {
    /// Serves the root of `repo`; [`url`](Self::url) points at it.
    pub fn start(repo: &BareRepo) -> Self {
        Self::start_root(repo.root(), repo.name())
    }

    /// Serves every repo under `root`; [`url`](Self::url) points at `root/repo_name`.
    pub fn start_root(root: &Path, repo_name: &str) -> Self {
        let logs = tempfile::tempdir().expect("cannot create a temp dir");
        let log = logs.path().join("daemon.log");
        let port = free_port();
        // The git-daemon program itself: `git daemon` runs it as a child, which a kill of `git` would leave behind.
        let exec_path = git_command()
            .arg("--exec-path")
            .output()
            .expect("cannot run git (apt-get install -y git)");
        let daemon =
            PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let child = git_command_at(&daemon)
            .args([
                "--export-all",
                "--enable=receive-pack",
                "--reuseaddr",
                "--informative-errors",
            ])
            .arg(format!("--base-path={}", root.display()))
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("cannot start `git daemon` (apt-get install -y git)");
        let mut child = ChildGuard {
            child,
            what: "git daemon".into(),
            log,
        };
        child.wait_for_port(port);
        Self {
            _child: child,
            _logs: logs,
            port,
            repo_name: repo_name.to_owned(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `git://127.0.0.1:P/repo.git`.
    pub fn url(&self) -> String {
        self.url_for(&self.repo_name)
    }

    /// The URL of another repo under the served root.
    pub fn url_for(&self, repo_name: &str) -> String {
        format!("git://127.0.0.1:{}/{repo_name}", self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping the handle ends the server: nothing listens on its port any more (killing a `git daemon` wrapper
    /// used to leave the real `git-daemon` serving, one leaked process per test).
    #[test]
    fn dropping_the_daemon_stops_serving() {
        let repo = BareRepo::new();
        let daemon = GitDaemon::start(&repo);
        let port = daemon.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(daemon);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "a git-daemon still listens on port {port} after the GitDaemon was dropped"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
