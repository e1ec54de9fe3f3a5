//! Test helpers: real git servers on 127.0.0.1, no mocks.
//!
//! Each helper starts real processes on an ephemeral port, waits until the port accepts
//! connections, and stops them (and deletes its temp dirs) on `Drop`. A missing tool makes the
//! helper panic with the command that installs it, so a test never passes silently without its
//! server.
//!
//! | helper | server | what it is for |
//! | --- | --- | --- |
//! | [`BareRepo`] | a bare repo in a temp dir (`file://`) | the remote of most tests; inspected with the real `git` CLI (`log_subjects`, `read`, `ls_tree`, `commit_count`, `rev_parse`) and pushed to by a simulated human (`commit_as_human`) |
//! | [`GitDaemon`] | `git daemon --enable=receive-pack` | the `git://` transport (unauthenticated) |
//! | [`HttpGitServer`] | `git http-backend` (CGI) behind a small hyper + rustls HTTPS server with HTTP basic auth | smart HTTP over TLS: credentials, wrong passwords, custom CA ([`HttpGitServer::ca_file`]) |
//! | [`SshGitServer`] | OpenSSH `sshd` with its own config, host key and one authorised client key | the SSH transport: private keys, known_hosts verification (`apt-get install -y openssh-server`) |
//!
//! [`RealCluster`] is a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager v1.37.2, built
//! from Go modules by `scripts/build-real-kube.sh`) on loopback ports.
//!
//! [`netns`] puts processes in network namespaces joined by veth links and makes packets vanish or get lost
//! there (nftables); [`fault_proxy`] makes a TCP link slow (delay, bandwidth) and carries a namespace's traffic to
//! a server on loopback.
//!
//! [`http_get`], [`metric`], [`metric_sum`] and [`cpu_secs`] read a process's metrics endpoint and CPU time;
//! [`machine_busy_secs`] the CPU time of the whole machine.
//!
//! [`corpus`] is the benchmark corpus (ConfigMaps and Deployments at the agent's paths) shared by the writer's
//! and the agent's benchmarks.
//!
//! Every server serves a root directory; [`BareRepo::new`] puts `repo.git` in its own root, and
//! each server has a `url()` for that repo (and `url_for(name)` for others).

mod bare;
pub mod corpus;
mod daemon;
pub mod fault_proxy;
mod http;
pub mod netns;
pub mod real_cluster;
mod scrape;
mod ssh;
mod util;

pub use bare::BareRepo;
pub use daemon::GitDaemon;
pub use http::HttpGitServer;
pub use real_cluster::{RealCluster, real_kube_binary};
pub use scrape::{cpu_secs, http_get, machine_busy_secs, metric, metric_sum};
pub use ssh::SshGitServer;
pub use util::{OrphanWatchdog, free_port, git, manifest_dir, require_tool, workspace_root};
