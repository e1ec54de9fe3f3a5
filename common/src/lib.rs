//! Pure building blocks shared by `reverser-agent` and `reverser-writer`, plus the small I/O pieces both
//! binaries need identically (logging set-up, the admin HTTP endpoint, flag groups, the Kubernetes client, Leases, TLS certificate reload, backoff, the
//! stop signal).
//!
//! - [`paths`]: which repository paths and base folders are acceptable, the marker location, snapshot scopes.
//! - [`yaml`]: parsing canonical YAML and comparing documents semantically (no-op detection).
//! - [`yaml_edit`]: comment- and order-preserving edits of a YAML document towards a desired rendering.
//! - [`preview`]: the suspend preview the writer plans and the agent publishes (each converts it at its gRPC edge).
//! - [`rate`]: a token bucket (the writer's per-client message rate, the agent's per-type request rate).
//! - [`sops`]: the fingerprint annotation of SOPS-encrypted files and the generated `.sops.yaml`.
//! - [`telemetry`]: `tracing` subscriber set-up (plain or JSON).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` over HTTP.
//! - [`backoff`]: exponential backoff with jitter and a cap (every retry loop of both binaries).
//! - [`shutdown`]: the stop request (SIGTERM or ctrl-c).
//! - [`lease`]: claiming and renewing a Kubernetes Lease (the agent's leader election, the writer's worker fence).
//! - [`kube_client`]: the Kubernetes client of both binaries (`--kubeconfig`, else in-cluster).
//! - [`args`]: the flag groups both binaries flatten (`LogArgs`, `AdminArgs`, `KubeArgs`) and the duration parser.
//! - [`tls`]: the server certificate and client CA, re-read from their files or replaced while serving (the
//!   agent's webhook, the writer's gRPC server).
//!
//! The I/O pieces (`admin`, `args`, `kube_client`, `lease`, `rate`, `shutdown`, `telemetry`, `tls`) need the
//! default `runtime` feature; the pure modules build without it (`reverser-agent-core` uses them so).

#[cfg(feature = "runtime")]
pub mod admin;
#[cfg(feature = "runtime")]
pub mod args;
pub mod backoff;
pub mod commit_message;
#[cfg(feature = "runtime")]
pub mod kube_client;
#[cfg(feature = "runtime")]
pub mod lease;
pub mod paths;
pub mod preview;
#[cfg(feature = "runtime")]
pub mod rate;
pub mod reasons;
#[cfg(feature = "runtime")]
pub mod shutdown;
pub mod sops;
#[cfg(feature = "runtime")]
pub mod telemetry;
#[cfg(feature = "runtime")]
pub mod tls;
pub mod yaml;
pub mod yaml_edit;
