//! Network namespaces joined by veth links, with faults made inside them by nftables: packets that vanish
//! (nothing is refused, no RST, no ICMP), random loss, and healing. Linux only, as root (`ip` from iproute2 and
//! `nft` from nftables; `scripts/install-test-deps.sh` installs them).
//!
//! ```text
//!   root namespace (the test, its servers)          Netns "agent"                Netns "writer"
//!   10.N.L.1 ──────────── veth link L ──────────── 10.N.L.2        10.N.M.1 ── veth M ── 10.N.M.2
//! ```
//!
//! Every link is a point-to-point /30 of its own, so no namespace routes for another and a fault on one link
//! touches nothing else. The second octet `N` comes from the test process's id, so concurrent test processes
//! do not share addresses. Faults live in an nftables table of the namespace (input and output hooks) and are
//! removed by [`Netns::heal`]. Dropping a [`Netns`] deletes the namespace, which deletes its veth ends and
//! their peers; a namespace left by a killed test is deleted by the next test that picks the same name.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaces and links made by this process so far (names and subnets are unique per process).
static CREATED: AtomicU32 = AtomicU32::new(0);
static LINKS: AtomicU32 = AtomicU32::new(0);

/// The `ip` and `nft` binaries exist and we may create namespaces; panics with what is missing otherwise.
pub fn require_netns() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
            crate::require_tool(tool, &format!("apt-get install -y {package}"));
        }
        let probe = format!("gr{}probe", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &probe])
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "network namespaces are needed (run the tests as root): ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    });
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// This process's address block: 10.N.0.0/16 with N in 64..=127.
fn second_octet() -> u32 {
    64 + std::process::id() % 64
}

/// A network namespace with loopback up and an empty nftables table `faults`.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `gr<pid>-<n>-<tag>` (a stale one of that name is deleted first).
    pub fn create(tag: &str) -> Netns {
        require_netns();
        let n = CREATED.fetch_add(1, Ordering::Relaxed);
        let name = format!("gr{}-{n}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.nft(
            "table inet faults {
               chain input { type filter hook input priority 0; policy accept; }
               chain output { type filter hook output priority 0; policy accept; }
             }",
        );
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> args…`; panics on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Loads an nftables script in the namespace; panics on failure.
    pub fn nft(&self, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft runs");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft in {}: {}\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Every packet to or from `peer` vanishes (both directions, nothing is refused).
    pub fn drop_host(&self, peer: &str) {
        self.nft(&format!(
            "add rule inet faults output ip daddr {peer} drop
             add rule inet faults input ip saddr {peer} drop"
        ));
    }

    /// Every packet of connections to `peer:port` (this namespace being the client) vanishes.
    pub fn drop_service(&self, peer: &str, port: u16) {
        self.nft(&format!(
            "add rule inet faults output ip daddr {peer} tcp dport {port} drop
             add rule inet faults input ip saddr {peer} tcp sport {port} drop"
        ));
    }

    /// `percent` % of the packets to or from `peer`, chosen at random in each direction, vanish.
    pub fn lose(&self, peer: &str, percent: u8) {
        self.nft(&format!(
            "add rule inet faults output ip daddr {peer} numgen random mod 100 < {percent} drop
             add rule inet faults input ip saddr {peer} numgen random mod 100 < {percent} drop"
        ));
    }

    /// The fault rules in place, for failure messages.
    pub fn faults(&self) -> String {
        let out = run(
            "ip",
            &[
                "netns", "exec", &self.name, "nft", "list", "table", "inet", "faults",
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Removes every fault: packets flow again (connections that outlived the fault resume).
    pub fn heal(&self) {
        self.nft("flush chain inet faults input\nflush chain inet faults output");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth link between two namespaces (`None`: the root namespace, where the test runs), with an address on
/// each end of its own /30.
pub struct Link {
    /// The address of the first end (`a`).
    pub a: String,
    /// The address of the second end (`b`).
    pub b: String,
}

impl Link {
    /// Creates a link from `a` to `b`, on the next free /30 of this process.
    pub fn connect(a: Option<&Netns>, b: &Netns) -> Link {
        let index = LINKS.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(index < 16_000, "too many links in one process");
        let n = second_octet();
        let base = index * 4;
        let (a_ip, b_ip) = (
            format!("10.{n}.{}.{}", base / 256, base % 256 + 1),
            format!("10.{n}.{}.{}", base / 256, base % 256 + 2),
        );
        let pid = std::process::id() % 100_000;
        let (a_if, b_if) = (format!("gr{pid}l{index}a"), format!("gr{pid}l{index}b"));
        // A veth of a killed earlier test with the same name would make `add` fail.
        let _ = Command::new("ip").args(["link", "del", &a_if]).output();
        run(
            "ip",
            &[
                "link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", &b.name,
            ],
        );
        match a {
            Some(ns) => {
                run("ip", &["link", "set", &a_if, "netns", &ns.name]);
                ns.ip(&["addr", "add", &format!("{a_ip}/30"), "dev", &a_if]);
                ns.ip(&["link", "set", &a_if, "up"]);
            }
            None => {
                run("ip", &["addr", "add", &format!("{a_ip}/30"), "dev", &a_if]);
                run("ip", &["link", "set", &a_if, "up"]);
            }
        }
        b.ip(&["addr", "add", &format!("{b_ip}/30"), "dev", &b_if]);
        b.ip(&["link", "set", &b_if, "up"]);
        Link { a: a_ip, b: b_ip }
    }
}
