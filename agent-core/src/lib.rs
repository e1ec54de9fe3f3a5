//! The pure core of the gitops-reverser agent: everything that decides, nothing that connects.
//!
//! Data flow (the agent crate, `reverser-agent`, does the I/O at both ends):
//!
//! ```text
//! custom resources ──▶ config::resolve ──▶ Selection ──▶ ingest::discovery ──▶ WatchPlans
//! (reverser-agent-api)  (access policy,     (compiled      (planner: which types,
//!                        credentials,        rules)          scopes, destinations)
//!                        encryption)
//!
//! watch events ──▶ ingest::index::WatchIndex ──▶ events::AgentEvent ──▶ (the agent's gRPC stream)
//! (WatchEvent)      (rules, ignore, canonical YAML,
//!                    paths, sops sealing, attribution)
//! ```
//!
//! - [`crd`]: the custom resources (re-exported from `reverser-agent-api`) and their rendered manifests.
//! - [`rules`]: which resource types and objects a `WatchRule` or `ClusterWatchRule` selects, the always-on
//!   exclusions and the sensitive types.
//! - [`config`]: resolves the custom resources into the [`config::Selection`] ingestion mirrors, with a Ready
//!   condition or the reason it is not for every rule and destination.
//! - [`conditions`]: the status conditions of rules and destinations.
//! - [`canonical`]: sanitizes an object and renders the one canonical YAML form.
//! - [`paths`]: maps an object to its file path below a destination's base folder.
//! - [`sops`]: SOPS v3 + age encryption of sensitive objects and their keyed fingerprints.
//! - [`credentials`]: the repositories' credentials as values (read from Secrets by the agent).
//! - [`events`]: what ingestion hands the stream, and what the stream hands back.
//! - [`attribution`]: who made a change, as a trait the watch index asks (the agent's webhook answers).
//! - [`ignore`]: which changes a rule does not mirror, by who made them.
//! - [`ingest`]: the discovery planner and the watch index.
//!
//! Never import a network client here: no kube `Client` (kube is built without its `client` and `runtime`
//! features), no tonic or protobuf, no hyper or TLS server. The I/O lives in `reverser-agent`, which re-exports
//! these modules under the same names; `tests/network_free.rs` fails when this crate's dependencies pull one in.

pub mod attribution;
pub mod canonical;
pub mod conditions;
pub mod config;
pub mod crd;
pub mod credentials;
pub mod events;
pub mod ignore;
pub mod ingest;
pub mod paths;
pub mod rules;
pub mod sops;
