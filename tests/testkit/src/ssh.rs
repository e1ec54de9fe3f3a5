//! OpenSSH `sshd` on 127.0.0.1 with its own config, a generated ed25519 host key and one
//! authorised client key; git runs over it as `git-upload-pack` / `git-receive-pack`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

use crate::BareRepo;
use crate::util::{ChildGuard, free_port, require_tool};

const SSHD: &str = "/usr/sbin/sshd";
const INSTALL_SSHD: &str =
    "the SSH tests need OpenSSH's sshd at /usr/sbin/sshd: apt-get install -y openssh-server";

/// A running `sshd -D -e -f <temp config>` that lets the current user in with
/// [`client_private_key`](Self::client_private_key).
pub struct SshGitServer {
    _child: ChildGuard,
    dir: TempDir,
    port: u16,
    user: String,
    root: PathBuf,
    repo_name: String,
}

impl SshGitServer {
    /// Serves `repo` (by absolute path); [`url`](Self::url) points at it.
    pub fn start(repo: &BareRepo) -> Self {
        Self::start_root(repo.root(), repo.name())
    }

    /// Serves repos under `root`; [`url`](Self::url) points at `root/repo_name`.
    pub fn start_root(root: &Path, repo_name: &str) -> Self {
        let sshd = require_tool(SSHD, INSTALL_SSHD);
        let dir = tempfile::tempdir().expect("cannot create a temp dir");
        set_mode(dir.path(), 0o700);
        let host_key = keygen(dir.path(), "host_ed25519");
        let client_key = keygen(dir.path(), "client_ed25519");
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized)
            .expect("write authorized_keys");
        set_mode(&authorized, 0o600);
        // sshd's privilege separation directory; a fresh machine may not have it yet.
        let privsep = Path::new("/run/sshd");
        if !privsep.exists() && std::fs::create_dir_all(privsep).is_ok() {
            set_mode(privsep, 0o755);
        }
        let user = current_user();
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 AllowUsers {user}\nLogLevel VERBOSE\nMaxStartups 100\n",
                host = host_key.display(),
                pid = dir.path().join("sshd.pid").display(),
                authorized = authorized.display(),
            ),
        )
        .expect("write sshd_config");
        let log = dir.path().join("sshd.log");
        let child = Command::new(&sshd)
            .arg("-f")
            .arg(&config)
            .args(["-D", "-e"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e} ({INSTALL_SSHD})"));
        let mut child = ChildGuard {
            child,
            what: "sshd".into(),
            log,
        };
        child.wait_for_port(port);
        Self {
            _child: child,
            dir,
            port,
            user,
            root: root.to_owned(),
            repo_name: repo_name.to_owned(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user the client key logs in as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `ssh://user@127.0.0.1:P/abs/path/repo.git`.
    pub fn url(&self) -> String {
        self.url_for(&self.repo_name)
    }

    /// The URL of another repo under the served root.
    pub fn url_for(&self, repo_name: &str) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            self.root.join(repo_name).display()
        )
    }

    /// The authorised client key, OpenSSH private key format, no passphrase.
    pub fn client_private_key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("client_ed25519")).expect("read client key")
    }

    /// A known_hosts line for this server: `[127.0.0.1]:P ssh-ed25519 AAAA…`.
    pub fn known_hosts(&self) -> String {
        known_hosts_line(self.port, &self.dir.path().join("host_ed25519.pub"))
    }

    /// A well-formed known_hosts line for this host and port but with a different key, as if
    /// the server had been replaced by an impostor.
    pub fn foreign_known_hosts(&self) -> String {
        let other = tempfile::tempdir().expect("cannot create a temp dir");
        let key = keygen(other.path(), "other_ed25519");
        known_hosts_line(self.port, &key.with_extension("pub"))
    }

    /// A valid private key that is not authorised on this server.
    pub fn foreign_private_key(&self) -> String {
        let other = tempfile::tempdir().expect("cannot create a temp dir");
        let key = keygen(other.path(), "stranger_ed25519");
        std::fs::read_to_string(key).expect("read key")
    }

    /// What sshd logged so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

fn known_hosts_line(port: u16, public_key: &Path) -> String {
    let public = std::fs::read_to_string(public_key).expect("read public key");
    let mut fields = public.split_whitespace();
    let (kind, key) = (
        fields.next().expect("key type"),
        fields.next().expect("key"),
    );
    format!("[127.0.0.1]:{port} {kind} {key}\n")
}

/// Generates an unencrypted ed25519 key pair `dir/name` (+ `.pub`), private key mode 0600.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let tool = require_tool("ssh-keygen", "apt-get install -y openssh-client");
    let path = dir.join(name);
    let out = Command::new(tool)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_mode(&path, 0o600);
    path
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
