//! Pure building blocks shared by `reverser-agent` and `reverser-writer`, plus the two small I/O pieces both
//! binaries need identically (logging set-up and the admin HTTP endpoint).
//!
//! - [`paths`]: which repository paths and base folders are acceptable, the marker location, snapshot scopes.
//! - [`yaml`]: parsing canonical YAML and comparing documents semantically (no-op detection).
//! - [`rate`]: a token bucket (the writer's per-client message rate, the agent's per-type request rate).
//! - [`sops`]: the fingerprint annotation of SOPS-encrypted files and the generated `.sops.yaml`.
//! - [`telemetry`]: `tracing` subscriber set-up (plain or JSON).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` over HTTP.

pub mod admin;
pub mod paths;
pub mod rate;
pub mod reasons;
pub mod sops;
pub mod telemetry;
pub mod yaml;
