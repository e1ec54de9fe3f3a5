//! Process plumbing shared by the servers: tool lookup, the `git` CLI, ports, child cleanup.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Returns the path of a required tool or panics with the way to install it.
pub fn require_tool(name: &str, install_hint: &str) -> PathBuf {
    let candidate = Path::new(name);
    if candidate.is_absolute() {
        if candidate.exists() {
            return candidate.to_owned();
        }
    } else if let Some(found) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
    {
        return found;
    }
    panic!("required tool `{name}` is not installed: {install_hint}");
}

/// A `git` command isolated from the user's and the system's configuration.
pub(crate) fn git_command() -> Command {
    git_command_at(&require_tool("git", "apt-get install -y git"))
}

/// A git program (`git` or one of its helpers such as `git-daemon`) with the environment of [`git_command`].
pub(crate) fn git_command_at(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(Stdio::null());
    cmd
}

/// Runs the `git` CLI (in `cwd` if given) and returns its output, whatever the exit status.
pub fn git(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = git_command();
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run git {args:?}: {e}"))
}

/// Runs the `git` CLI and panics with its stderr unless it succeeds; returns stdout.
pub(crate) fn git_ok(cwd: Option<&Path>, args: &[&str]) -> Vec<u8> {
    let out = git(cwd, args);
    assert!(
        out.status.success(),
        "git {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// A child process that is killed and reaped on drop.
pub(crate) struct ChildGuard {
    pub child: Child,
    pub what: String,
    pub log: PathBuf,
}

impl ChildGuard {
    /// Waits until `port` accepts TCP connections; panics with the server's log when the child
    /// exits or 15 s pass.
    pub fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before listening on 127.0.0.1:{port}:\n{}",
                    self.what,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on 127.0.0.1:{port} after 15 s:\n{}",
                self.what,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The package directory of the running test or bench: `CARGO_MANIFEST_DIR` as cargo and nextest set it when they
/// run the binary, else the working directory (where they start it).
///
/// Not `env!("CARGO_MANIFEST_DIR")`: that is fixed when the binary is compiled, and a build cache shared by several
/// checkouts (scripts/test.sh keeps one outside git) reuses binaries compiled in another checkout, whose fixtures
/// may differ or be gone.
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .expect("CARGO_MANIFEST_DIR or a working directory")
}

/// The repository root: the nearest directory at or above [`manifest_dir`] that holds `Cargo.lock`.
pub fn workspace_root() -> PathBuf {
    let start = manifest_dir();
    start
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or_else(|| panic!("no Cargo.lock at or above {}", start.display()))
        .to_owned()
}

/// A `sh` loop that SIGKILLs process groups once this process is gone, however it ended: a SIGKILLed test or bench,
/// a runner's timeout, Ctrl-C. `Drop` handlers and `kill_on_drop` run only when this process unwinds or exits on its
/// own, so children started with `process_group(0)` would otherwise outlive it (and keep ports, CPU and memory).
/// Dropping the watchdog stops the loop without killing anything.
#[derive(Debug)]
pub struct OrphanWatchdog(Option<Child>);

impl OrphanWatchdog {
    /// Watches the process groups whose leaders are `groups` (children spawned with `process_group(0)`).
    /// `kill -KILL -PGID`, not `kill -KILL -- -PGID`: dash's builtin refuses the latter ("Illegal number").
    pub fn spawn(groups: &[u32]) -> Self {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; for p in {groups}; do kill -KILL -$p 2>/dev/null; done",
            parent = std::process::id(),
            groups = groups.join(" ")
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Not in this process's group: a Ctrl-C to the group must not end the watchdog first.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the orphan watchdog (sh): {e}"));
        Self(Some(child))
    }
}

impl Drop for OrphanWatchdog {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
